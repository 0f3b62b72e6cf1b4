"""The results as metrics: the store of latest results and counts (`store`) and the
streamed exposition of /metrics (`exposition`)."""
