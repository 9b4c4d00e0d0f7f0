"""Delivery: the queue manager and the couriers it drives (local Maildir, outbound SMTP), and
the delivery status notifications they cause."""
