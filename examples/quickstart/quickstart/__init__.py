"""Flower's PyTorch quickstart on Fashion-MNIST, in its FedAvg form and its WASH form."""
