"""The requests of protocol 1.2 that `Client` gains by mixing these in: conversation state (cap `memory`) and
scenes (cap `scene`). Their replies arrive through `Client.poll` like any other."""


class MemoryCalls:
    """Conversation state and memories; uses Client's `_capped_request`."""

    def export_session(self, session: str, npc: str | None = None) -> str:
        """Ask for the save-file blob of `session`: one NPC's conversation, or with npc None every NPC's.
        Answered by a `session.blob` event whose `blob` (bytes) goes into the save as is."""
        return self._memory_request({"type": "session.export", "session": session, "npc": npc})

    def import_session(self, blob: bytes, session: str | None = None) -> str:
        """Restore a blob of `export_session` (into `session`, else the one it came from); answered by
        `session.imported`, or an `error` (`bad_blob`, `blob_version`, `too_large`) that changed nothing."""
        return self._memory_request({"type": "session.import", "blob": bytes(blob), "session": session})

    def add_memory(self, npc: str, session: str, text: str) -> str:
        """Tell `npc` something to remember about this player; answered by `memory.added` (`memory_id`)."""
        return self._memory_request({"type": "memory.add", "npc": npc, "session": session, "text": text})

    def list_memories(self, npc: str, session: str) -> str:
        """Answered by `memories`: `[{"memory_id", "text"}, ...]`, oldest first."""
        return self._memory_request({"type": "memory.list", "npc": npc, "session": session})

    def forget_memory(self, npc: str, session: str, memory_id: int | None = None) -> str:
        """Forget one memory, or all with memory_id None; answered by `memory.forgotten` (`forgotten`)."""
        return self._memory_request({"type": "memory.forget", "npc": npc, "session": session,
                                     "memory_id": memory_id})

    def _memory_request(self, msg: dict) -> str:
        return self._capped_request("memory", "conversation state", msg)


class SceneCalls:
    """Scenes of several NPCs (PROTOCOL.md, "Scenes"); uses Client's `_capped_request` and `_start_line`."""

    def open_scene(self, scene: str, cast: list[str], situation: str, *, host: str | None = None,
                   itinerary: list | None = None, guests: list[dict] | None = None, player: bool = True,
                   player_role: str | None = None) -> str:
        """Open a scene of several NPCs; answered by `scene.state`. `itinerary`: texts or `{"text", "at"}` maps,
        run by the `host`; `guests`: `{"name", "rsvp", "role", "npc"}` maps."""
        return self._scene_request({"type": "scene.open", "scene": scene, "cast": list(cast), "situation": situation,
                                    "host": host, "itinerary": itinerary, "guests": guests, "player": player,
                                    "player_role": player_role})

    def scene_say(self, scene: str, text: str, *, to: str | None = None, max_tokens: int | None = None,
                  temperature: float | None = None, seed: int | None = None, deadline_ms: float | None = None,
                  stream: bool = True, id: str | None = None) -> str:
        """The player speaks into `scene` (to one cast member, or to whoever the scene picks); returns the id of
        the line that answers: a `line` event (speaker, addressee), `token`s, one terminal event. It interrupts
        the scene's line in flight."""
        return self._scene_line({"type": "scene.say", "scene": scene, "text": text, "to": to}, id, max_tokens,
                                temperature, seed, deadline_ms, stream)

    def scene_next(self, scene: str, *, speaker: str | None = None, to: str | None = None,
                   max_tokens: int | None = None, temperature: float | None = None, seed: int | None = None,
                   deadline_ms: float | None = None, stream: bool = True, id: str | None = None) -> str:
        """Ask `scene` for its next line (ambient), by `speaker` if given; events as for `scene_say`
        (`scene_busy` while a line of the scene is in flight)."""
        return self._scene_line({"type": "scene.next", "scene": scene, "speaker": speaker, "to": to}, id,
                                max_tokens, temperature, seed, deadline_ms, stream)

    def scene_event(self, scene: str, *, text: str | None = None, arrive: str | None = None,
                    leave: str | None = None, itinerary: str | int | None = None) -> str:
        """Tell `scene` what happened: `text` (into the transcript), a guest or "player" arriving or leaving, the
        itinerary moving on ("next" or an item number). Answered by `scene.state`."""
        return self._scene_request({"type": "scene.event", "scene": scene, "text": text, "arrive": arrive,
                                    "leave": leave, "itinerary": itinerary})

    def scene_cast(self, scene: str, *, add: list[str] = (), remove: list[str] = ()) -> str:
        """NPCs join or leave `scene`; answered by `scene.state`."""
        return self._scene_request({"type": "scene.cast", "scene": scene, "add": list(add), "remove": list(remove)})

    def close_scene(self, scene: str) -> str:
        """Answered by `scene.closed`; the line in flight ends cancelled."""
        return self._scene_request({"type": "scene.close", "scene": scene})

    def scene_state(self, scene: str) -> str:
        """Answered by `scene.state`: cast, presence, itinerary position, guests, transcript, the line in flight."""
        return self._scene_request({"type": "scene.state", "scene": scene})

    def _scene_request(self, msg: dict) -> str:
        return self._capped_request("scene", "scenes", msg)

    def _scene_line(self, msg: dict, id: str | None, max_tokens, temperature, seed, deadline_ms, stream) -> str:
        self._check_cap("scene", "scenes")
        rid = self._new_id(id)
        optional = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed, "deadline_ms": deadline_ms}
        msg = {k: v for k, v in (msg | optional).items() if v is not None} | {"id": rid, "stream": stream}
        self._check(msg)
        return self._start_line(rid, msg, deadline_ms)
