"""The doors readings come in by: the embedded broker, an external broker's client, and the
MQTT update parser both share. (HTTP, the third door, is the facade in `http_api/`.)"""
