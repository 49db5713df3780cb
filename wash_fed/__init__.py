"""wash-fed: train an ensemble across Flower clients and merge it into one model with WASH.

The library is framework-free (torch and numpy): :mod:`wash_fed.shuffle` holds the WASH
math; :mod:`wash_fed.soup`, :mod:`wash_fed.batchnorm` and :mod:`wash_fed.merge` the final
averaging; :mod:`wash_fed.training` one member's local training; :mod:`wash_fed.population`
a single-process trainer. The Flower apps live in the ``server`` and ``client`` packages.
"""

__version__ = "0.1.0"
