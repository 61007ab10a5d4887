"""OpenDelta's ``opendelta.utils`` helpers that user code imports (``utils.inspect``)."""
