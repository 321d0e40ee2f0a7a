"""The client: trains on its slices of MNIST and exchanges weights with the aggregator."""
