"""Scripted sessions for headless runs: a JSON list of actions done one after another.

Each action is an object with a `do` key (see ACTIONS and demo_game/README.md) and an optional
`at`: the action does not start before `at` seconds after the session began.
"""
import json
import os

from demo_game.cast import HOST_ID, CastMember
from demo_game.evening import AMBIENT_MAX_TOKENS

# action -> {field: (types, required)}
ACTIONS = {
    "walk_to": {"npc": ((str,), True), "timeout": ((int, float), False)},
    "say": {"text": ((str,), True)},
    "wait": {"seconds": ((int, float), True)},
    "wait_reply": {"timeout": ((int, float), False)},
    "walk_away": {"timeout": ((int, float), False)},
    "wait_idle": {"timeout": ((int, float), False)},
    "wait_connected": {"timeout": ((int, float), False)},
    "toast": {"max_tokens": ((int,), False)},
    "chatter": {"on": ((bool,), True)},
    "save": {"timeout": ((int, float), False)},
    "load": {"timeout": ((int, float), False)},
}
DEFAULT_TIMEOUT_S = 20.0


class ScriptError(ValueError):
    pass


def validate(actions, cast_ids: set[str]) -> list[dict]:
    if not isinstance(actions, list):
        raise ScriptError("a script is a JSON list of actions")
    for index, action in enumerate(actions):
        where = f"action {index}"
        if not isinstance(action, dict):
            raise ScriptError(f"{where}: expected an object, got {type(action).__name__}")
        kind = action.get("do")
        if kind not in ACTIONS:
            raise ScriptError(f"{where}: 'do' must be one of {', '.join(ACTIONS)}, got {kind!r}")
        fields = ACTIONS[kind]
        for key, value in action.items():
            if key in ("do", "at"):
                continue
            if key not in fields:
                raise ScriptError(f"{where} ({kind}): unknown field {key!r}")
            types, _ = fields[key]
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                raise ScriptError(f"{where} ({kind}): {key!r} must be "
                                  f"{' or '.join(t.__name__ for t in types)}, got {value!r}")
        for key, (_, required) in fields.items():
            if required and key not in action:
                raise ScriptError(f"{where} ({kind}): missing field {key!r}")
        at = action.get("at", 0)
        if isinstance(at, bool) or not isinstance(at, (int, float)) or at < 0:
            raise ScriptError(f"{where} ({kind}): 'at' must be a number >= 0, got {at!r}")
        if kind == "walk_to" and action["npc"] not in cast_ids:
            raise ScriptError(f"{where} (walk_to): no NPC {action['npc']!r} in the cast "
                              f"({', '.join(sorted(cast_ids))})")
    return actions


def load_script(path: str | os.PathLike, cast_ids: set[str]) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            actions = json.load(f)
    except OSError as e:
        raise ScriptError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise ScriptError(f"{path}: invalid JSON: {e}") from None
    try:
        return validate(actions, cast_ids)
    except ScriptError as e:
        raise ScriptError(f"{path}: {e}") from None


def default_script(cast: list[CastMember]) -> list[dict]:
    """Talk to three patrons (walking away from one mid-reply), then to the host, who raises a
    toast; ambient chatter runs all along."""
    patrons = [m.id for m in cast if m.id != HOST_ID]
    lines = ["Good evening! What news tonight?", "Any work going for a traveller?",
             "Tell me about this town."]
    script: list[dict] = [{"do": "wait", "seconds": 1.0}]
    for i, (npc, text) in enumerate(zip(patrons, lines)):
        script += [{"do": "walk_to", "npc": npc}, {"do": "say", "text": text}]
        if i == 1:  # leave before the answer is complete: the line is cancelled
            script += [{"do": "wait", "seconds": 0.4}, {"do": "walk_away"}]
        else:
            script += [{"do": "wait_reply"}, {"do": "wait", "seconds": 0.5}]
    if any(m.id == HOST_ID for m in cast):
        script += [{"do": "walk_to", "npc": HOST_ID},
                   {"do": "say", "text": "A room for the night, and your best ale."},
                   {"do": "wait_reply"}, {"do": "toast"}, {"do": "wait", "seconds": 1.5}]
    return script


class ScriptRunner:
    """Plays a script against the game through the same calls the keyboard uses."""

    def __init__(self, actions: list[dict], game, log=print):
        self.actions = actions
        self.game = game
        self.log = log  # told of every action as it starts
        self.index = 0
        self.started_at: float | None = None  # when the current action began
        self.t0: float | None = None
        self.partner: str | None = None  # the NPC last spoken to

    @property
    def finished(self) -> bool:
        return self.index >= len(self.actions)

    def update(self, now: float) -> None:
        if self.t0 is None:
            self.t0 = now
        while not self.finished:
            action = self.actions[self.index]
            if self.started_at is None:
                if now - self.t0 < action.get("at", 0):
                    return
                self.started_at = now
                self.log(f"script {now - self.t0:7.2f} s: action {self.index} {action['do']}")
                self._begin(action, now)
            if not self._done(action, now):
                return
            self.index += 1
            self.started_at = None

    def _fail(self, message: str):
        action = self.actions[self.index]
        raise ScriptError(f"action {self.index} ({action['do']}): {message}")

    def _begin(self, action: dict, now: float) -> None:
        game, kind = self.game, action["do"]
        if kind == "walk_to":
            if not game.walk_to_npc(action["npc"]):
                self._fail(f"no path to {action['npc']!r}")
        elif kind == "say":
            npc = game.npc_in_reach()
            if npc is None:
                self._fail("no NPC within talking range")
            self.partner = npc
            game.player_say(npc, action["text"], now)
        elif kind == "walk_away":
            npc = self.partner or game.npc_in_reach()
            if npc is None:
                self._fail("not near any NPC")
            self.partner = npc
            game.walk_away_from(npc)
        elif kind == "toast":
            game.evening.toast(now, action.get("max_tokens", AMBIENT_MAX_TOKENS))
        elif kind == "chatter":
            game.evening.enabled = action["on"]
        elif kind == "save":
            game.quick_save(now)
        elif kind == "load":
            game.quick_load(now)

    def _done(self, action: dict, now: float) -> bool:
        game, kind = self.game, action["do"]
        elapsed = now - self.started_at
        timeout = action.get("timeout", DEFAULT_TIMEOUT_S)
        if kind == "walk_to":
            if not game.walking:
                return True
        elif kind == "walk_away":
            if game.out_of_reach(self.partner):
                game.stop_walking()
                return True
            if not game.walking:
                self._fail("walked as far as it could without leaving")
        elif kind == "wait":
            return elapsed >= action["seconds"]
        elif kind == "wait_reply":
            if self.partner is None or not game.talk.busy(self.partner):
                return True
        elif kind == "wait_idle":
            if game.idle:
                return True
        elif kind == "wait_connected":
            if game.bridge.connected:
                return True
        elif kind in ("save", "load"):
            if not game.saves.busy:
                return True
        else:
            return True
        if elapsed >= timeout:
            self._fail(f"not done after {timeout:g} s")
        return False
