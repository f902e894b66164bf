"""What lowering targets: compute implementations and communication transports."""
