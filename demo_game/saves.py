"""Quick save and load (F5 / F9).

The save file (`quicksave.json`) holds where the player stands; next to it, `quicksave.npcstate` holds what
the NPCs remember of the player's own conversations: the service's blob of session `player`
(`session.export`, protocol 1.2 cap `memory`), kept as is. Loading restores both (`session.import`), so an NPC
remembers what the player said even after the service restarted. The evening's scene is not saved: it starts
over with every run of the demo.
"""
import json
import os
import sys
from pathlib import Path

from demo_game.metering import MeteredClient
from demo_game.talk import Conversations

SESSION = "player"  # the session of the player's own conversations (game.py)
SLOT = "quicksave"
FORMAT = 1
STATUS_S = 4.0  # how long the status line stays on screen
REPLY_TIMEOUT_S = 10.0  # a save or load whose reply never came (the service was lost) no longer blocks the next


def default_save_dir() -> Path:
    """The demo's folder in the user's data directory."""
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "npc-engine-demo" / "saves"


def write_atomically(path: Path, data: bytes) -> None:
    """A crash while saving leaves the previous file whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Saves:
    def __init__(self, bridge: MeteredClient, talk: Conversations, save_dir: Path):
        self.bridge = bridge
        self.talk = talk
        self.save_path = save_dir / f"{SLOT}.json"
        self.state_path = save_dir / f"{SLOT}.npcstate"
        self.status = ""  # the last save or load outcome, shown for STATUS_S
        self.status_at = float("-inf")
        self.waiting_since: float | None = None  # a save or load waits for the service's reply

    def show(self, message: str, now: float) -> None:
        self.status, self.status_at = message, now

    def visible_status(self, now: float) -> str:
        return self.status if now - self.status_at < STATUS_S else ""

    @property
    def busy(self) -> bool:
        return self.waiting_since is not None

    def _refused(self, now: float) -> bool:
        if self.busy and now - self.waiting_since < REPLY_TIMEOUT_S:
            self.show("still saving or loading...", now)
        elif not self.bridge.serves("memory"):
            self.show("conversations cannot be saved or loaded: no service, or it has no 'memory' cap", now)
        else:
            return False
        return True

    def save(self, player: tuple[float, float], now: float) -> None:
        """Ask the service for the conversations; the files are written when they arrive."""
        if self._refused(now):
            return
        self.waiting_since = now
        self.show("saving...", now)
        rid = self.bridge.export_session(SESSION)
        self.talk.expect(rid, lambda reply, at: self._saved(reply, player, at))

    def _saved(self, reply: dict, player: tuple[float, float], now: float) -> None:
        self.waiting_since = None
        if reply.get("type") != "session.blob":
            self.show(f"save failed: {reply.get('code')} {reply.get('message', '')}", now)
            return
        self.save_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.state_path, reply["blob"])
        game = {"format": FORMAT, "player": list(player), "state_file": self.state_path.name}
        write_atomically(self.save_path, json.dumps(game).encode())
        self.show(f"saved to {self.save_path}", now)

    def load(self, now: float) -> tuple[float, float] | None:
        """The saved player position (None without a readable save); the conversations follow once the
        service has taken them."""
        try:
            game = json.loads(self.save_path.read_text())
            blob = (self.save_path.parent / game["state_file"]).read_bytes()
            player = (float(game["player"][0]), float(game["player"][1]))
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            self.show(f"no save to load in {self.save_path.parent} ({type(e).__name__})", now)
            return None
        if self._refused(now):
            return player
        self.waiting_since = now
        self.show("loading...", now)
        rid = self.bridge.import_session(blob)
        self.talk.expect(rid, self._loaded)
        return player

    def _loaded(self, reply: dict, now: float) -> None:
        self.waiting_since = None
        if reply.get("type") != "session.imported":
            self.show(f"load failed: {reply.get('code')} {reply.get('message', '')}", now)
        else:
            self.show(f"loaded {self.save_path} ({len(reply.get('npcs', []))} conversations)", now)
