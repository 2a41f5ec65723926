"""Real-time predictions: the serving runtime (REST, MQTT request/reply, streaming) and deployments."""
