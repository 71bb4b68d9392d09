"""The doors readings come in by. MQTT: the embedded broker (`broker/`), or an external
broker reached through the MQTT link (`mqtt_link.py`, transport only) and its door
(`external_door.py`, ingest and ack order); both apply one update's rules in
`update_door.py`. HTTP, the third door, is the facade in `http_api/`."""
