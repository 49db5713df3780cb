"""Every way this project deploys Flower, beside the files the deployments use (compose
files, nginx template, certificates, stand-in images): the ``flwr`` CLI
(:mod:`deploy.flwr_cli`), local processes (:mod:`deploy.processes`), containers
(:mod:`deploy.roles`) and network namespaces over shaped links (:mod:`deploy.namespaces`),
with what tests and benchmarks run through them (:mod:`deploy.promql`,
:mod:`deploy.app_copies`)."""
