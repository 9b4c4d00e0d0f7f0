"""The message queue: the backend-neutral interface in `store` and its implementations."""
