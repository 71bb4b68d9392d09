"""Extensions: each reacts to core events, with async start() and stop(), started by the
composition root (batmon/service.py) in one declared order."""
