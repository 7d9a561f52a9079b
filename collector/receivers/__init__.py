"""OTLP receivers: the HTTP and gRPC transports, one error table (errors.py) and the wire
formats (otlp.py). Transports decode and answer; what a request means is decided behind the
export callable they are given."""
