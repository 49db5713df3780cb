"""wash-fed: train an ensemble across Flower clients and merge it into one model with WASH.

The public API (docs/api.md): :class:`wash_fed.strategy.Wash`, the strategy a ServerApp
starts like Flower's FedAvg; :func:`wash_fed.member_app.wash_client_app` and
:class:`wash_fed.clientapp.Task`, the member a ClientApp keeps around its own model and
training loop; :class:`wash_fed.config.WashFedConfig`, the settings. Below them, framework-
free (torch and numpy): :mod:`wash_fed.shuffle` holds the WASH math, :mod:`wash_fed.protocol`
the member protocol, :mod:`wash_fed.soup`, :mod:`wash_fed.batchnorm` and
:mod:`wash_fed.merge` the final averaging. This project's own apps live in the ``server`` and
``client`` packages; :mod:`wash_fed.population` is a single-process trainer.
"""

__version__ = "0.1.0"
