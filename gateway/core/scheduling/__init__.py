"""Callback reminders on JetStream message schedules, quiet hours and survey answers."""
