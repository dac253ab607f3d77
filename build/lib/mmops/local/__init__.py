"""The local stack on loopback (`mmops up`): a Kafka-compatible broker and an MLflow server."""
