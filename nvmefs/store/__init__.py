"""What is recorded and how it is read: events, the ring, their renderings, byte streams."""
