"""Decoding each OTLP signal into usage events. Pure: values in, values out."""
