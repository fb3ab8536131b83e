"""dbt's events in presend's forked dbt process: only those a log takes are formatted.

dbt turns everything it does into an event (each SQL statement it runs, each connection it
opens or reuses): it builds the event's protobuf message from a dict (google.protobuf's
ParseDict, pure Python), then a second message with the event's level, time and text, and
then formats the log line, which Python's logging drops only at the end when the line is
below the log's level (dbt-core#9030). An incremental build at 1M contacts fires ~1,400
debug events that no log keeps (dbt.log keeps info, as the task log does; see
transform.dbt_env): ~0.3 s of the build's CPU time, on the threads that run the models.

skip_unlogged_events(), in the forked dbt process before dbt runs, changes two things:
an event builds its message when something first reads it, and the event manager drops a
debug event, before building anything, when every log is above debug and no callback would
see it (dbt's own behaviour-change tracker looks at warnings only). With
DBT_LOG_LEVEL_FILE=debug dbt.log takes every event, as before.
"""

from __future__ import annotations

from typing import Any

# Levels Python's logging writes as debug (dbt_common.events.logger.send_to_logger).
_DEBUG_LEVELS = frozenset({"debug", "test"})
# Callbacks dbt itself adds that act on other events than the ones this drops.
_IGNORED_CALLBACKS = frozenset({"track_behavior_change_warn"})
_applied = False


def skip_unlogged_events() -> bool:
    """Apply both changes to dbt_common's event classes in this process (once); False if
    they are not shaped as this was written for (dbt_common 1.x): then nothing changes."""
    global _applied
    if _applied:
        return True
    from dbt_common.events import base_types, event_manager

    base = base_types.BaseEvent
    manager = event_manager.EventManager
    if not (hasattr(base, "level_tag") and hasattr(manager, "fire_event")):
        return False
    build_message = base.__init__
    fire_event = manager.fire_event

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        object.__setattr__(self, "_presend_event_args", (args, kwargs))

    def __getattr__(self: Any, key: str) -> Any:
        if key != "pb_msg":
            return getattr(self.pb_msg, key)
        try:
            args, kwargs = object.__getattribute__(self, "_presend_event_args")
        except AttributeError:
            raise AttributeError(key) from None
        build_message(self, *args, **kwargs)  # sets pb_msg
        return object.__getattribute__(self, "pb_msg")

    def __setattr__(self: Any, key: str, value: Any) -> None:
        if key == "pb_msg":
            object.__setattr__(self, key, value)
        else:
            setattr(self.pb_msg, key, value)

    def fire_event_if_logged(
        self: Any,
        e: Any,
        level: Any = None,
        node: Any = None,
        force_warn_or_error_handling: bool = False,
    ) -> None:
        if (
            (level or e.level_tag()) in _DEBUG_LEVELS
            and not force_warn_or_error_handling  # may turn it into an error
            and not any(log.level in _DEBUG_LEVELS for log in self.loggers)
            and all(getattr(c, "__name__", "") in _IGNORED_CALLBACKS for c in self.callbacks)
        ):
            return
        fire_event(self, e, level, node, force_warn_or_error_handling)

    base.__init__ = __init__
    base.__getattr__ = __getattr__
    base.__setattr__ = __setattr__
    manager.fire_event = fire_event_if_logged
    _applied = True
    return True
