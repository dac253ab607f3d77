"""Live predictions from Kafka: settings, the event contract, metrics, the champion follower,
the consumer and the replay load generator."""
