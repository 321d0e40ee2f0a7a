"""fedsim: federated learning on MNIST, one aggregator and N clients over HTTP."""

__version__ = "0.1.0"
