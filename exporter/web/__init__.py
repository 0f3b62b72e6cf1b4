"""The HTTP surface: the application and its state (`app`), the webhook endpoint and its
token (`webhook`, `auth`), `/probe` (`probe`) and the status page (`status`)."""
