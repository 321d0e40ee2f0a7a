"""The aggregator: a Flask app on gunicorn that holds the global model and aggregates updates.

No TensorFlow here: the aggregator image carries only flask, gunicorn, numpy
and safetensors.
"""
