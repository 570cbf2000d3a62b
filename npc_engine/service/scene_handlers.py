"""The scene messages of protocol 1.2 (cap `scene`, PROTOCOL.md "Scenes"): a scene's state lives in
npc_engine.scenes, who speaks and what the speaker is shown in npc_engine.scene_policy. A scene line is an
ordinary Call (the same queue, engine, deadline, guard and cancel as a `say`) that carries its scene: the
service tells the scene when the line ends (Service.drop), and a `done` names the line's speaker and addressee."""

from bridge import protocol
from npc_engine.dialogue import sampling_params
from npc_engine.guard import banned_topic
from npc_engine.scene_policy import Pick, ambient, fit, reply_to_player, view
from npc_engine.scenes import Flight, Member, Scene, SceneError, SceneLimits, Scenes
from npc_engine.service.calls import Call
from npc_engine.service.handlers import answered_as
from npc_engine.service.transport import Incoming


def open_scenes(personas, limits: protocol.Limits) -> Scenes:
    def member(npc: str) -> Member:
        p = personas.get(npc)
        return Member(p.id, p.name, p.role)

    return Scenes(member, SceneLimits(max_cast=limits.max_scene_cast, max_scenes=limits.max_scenes,
                                      max_itinerary=limits.max_itinerary, max_guests=limits.max_guests))


class SceneHandlers:
    """Mixed into Service, whose `scenes`, `calls`, `personas`, `engine` and `transport` they use."""

    def scene(self, src: Incoming, msg: dict) -> Scene:
        with answered_as(msg["id"]):
            return self.scenes.get(src.user, msg["scene"])

    def send_state(self, client: bytes, mid: str, scene: Scene) -> None:
        self.transport.send(client, {"type": "scene.state", "id": mid, **scene.to_wire()})

    def on_scene_open(self, src: Incoming, msg: dict) -> None:
        with answered_as(msg["id"]):
            scene = self.scenes.open(src.user, msg["scene"], msg["cast"], msg["situation"], msg["host"],
                                     msg["itinerary"], msg["guests"], msg["player"], msg["player_role"])
        self.send_state(src.client, msg["id"], scene)

    def on_scene_state(self, src: Incoming, msg: dict) -> None:
        self.send_state(src.client, msg["id"], self.scene(src, msg))

    def on_scene_close(self, src: Incoming, msg: dict) -> None:
        scene = self.scene(src, msg)
        self.interrupt(scene)
        self.scenes.close(src.user, scene.id)
        self.transport.send(src.client, {"type": "scene.closed", "id": msg["id"], "scene": scene.id})

    def on_scene_event(self, src: Incoming, msg: dict) -> None:
        scene = self.scene(src, msg)
        item = scene.position if msg["itinerary"] == "next" else msg["itinerary"]
        with answered_as(msg["id"]):  # everything checked before anything changes
            if item is not None and not 0 <= item < len(scene.itinerary):
                raise SceneError("bad_itinerary", f"scene '{scene.id}': no itinerary item {item} (it has "
                                 f"{len(scene.itinerary)}; {scene.position} moved to)")
            for who in (msg["arrive"], msg["leave"]):
                if who not in (None, "player"):
                    scene.guest(who)  # not_in_cast
            if msg["text"] is not None:
                scene.event(msg["text"])
            if msg["arrive"] is not None:
                scene.arrive(msg["arrive"])
            if msg["leave"] is not None:
                scene.leave(msg["leave"])
            if item is not None:
                scene.advance(item)
        self.send_state(src.client, msg["id"], scene)

    def on_scene_cast(self, src: Incoming, msg: dict) -> None:
        scene = self.scene(src, msg)
        with answered_as(msg["id"]):
            for npc in msg["remove"]:
                if npc not in scene.members and npc not in msg["add"]:
                    raise SceneError("not_in_cast", f"scene '{scene.id}': '{npc}' is not in the cast")
            self.scenes.add(scene, msg["add"])
        for npc in msg["remove"]:
            if scene.flight is not None and scene.flight.speaker == npc:
                self.interrupt(scene)
            scene.remove(npc)
        self.send_state(src.client, msg["id"], scene)

    def on_scene_say(self, src: Incoming, msg: dict) -> None:
        scene = self.scene(src, msg)
        self.check_new_line(src, msg)
        with answered_as(msg["id"]):
            scene.player_line(msg["text"], msg["to"])
            pick = reply_to_player(scene, msg["to"], msg["text"])
        self.interrupt(scene)
        self.start_line(src, msg, scene, pick, "player")

    def on_scene_next(self, src: Incoming, msg: dict) -> None:
        scene = self.scene(src, msg)
        self.check_new_line(src, msg)
        if scene.flight is not None:
            raise protocol.ProtocolError("scene_busy", f"scene '{scene.id}' is speaking line '{scene.flight.id}'; "
                                         "one line at a time", msg["id"])
        with answered_as(msg["id"]):
            pick = ambient(scene, msg["speaker"], msg["to"])
        self.start_line(src, msg, scene, pick, "ambient")

    def check_new_line(self, src: Incoming, msg: dict) -> None:
        mid = msg["id"]
        if self.closing:
            raise protocol.ProtocolError("shutting_down", "the service is shutting down", mid)
        if self.calls.get(src.client, mid) is not None:
            raise protocol.ProtocolError("duplicate_id", f"request '{mid}' is still running", mid)
        if self.calls.per_client.get(src.client, 0) >= self.config.limits.max_inflight:
            raise protocol.ProtocolError("overloaded", f"this client already has {self.config.limits.max_inflight} "
                                         "requests running", mid)
        if len(self.calls) >= self.config.max_calls:
            raise protocol.ProtocolError("overloaded", f"the service is at its limit of {self.config.max_calls} "
                                         "requests", mid)

    def interrupt(self, scene: Scene) -> None:
        """End the scene's line in flight: `done` `cancelled: true` with what streamed."""
        flight = scene.flight
        call = None if flight is None else self.calls.get(flight.client, flight.id)
        if call is not None:
            self.finish(call, self.done(call, call.line.text[:call.line.shown], cancelled=True))
        scene.flight = None

    def start_line(self, src: Incoming, msg: dict, scene: Scene, pick: Pick, priority: str) -> None:
        mid, now = msg["id"], src.read_at
        try:
            persona = self.personas.get(pick.speaker)
        except KeyError:
            raise protocol.ProtocolError("unknown_npc", f"no NPC '{pick.speaker}' (its persona file is gone)",
                                         mid) from None
        params = sampling_params(persona, max_tokens=msg["max_tokens"], temperature=msg["temperature"],
                                 seed=msg["seed"], max_tokens_limit=self.config.limits.max_tokens)
        text = msg.get("text", "")
        deflect = priority == "player" and banned_topic(persona, text)
        if not deflect:
            with answered_as(mid):
                prompt = fit(self.tokenizer, view(scene, pick.speaker, persona.to_prompt_persona(), pick.cue),
                             self.engine.max_prompt_len(), params.max_tokens)
        cue = pick.cue
        self.transport.send(src.client, {"type": "line", "id": mid, "scene": scene.id, "speaker": pick.speaker,
                                         "to": pick.to, "cue": None if cue is None else cue.kind,
                                         "item": cue.item if cue is not None and cue.kind == "item" else None})
        scene.flight = Flight(mid, pick.speaker, pick.to, pick.cue, src.client)
        if deflect:
            scene.line_ended(persona.deflection)
            done = self.reply_done(mid, persona.deflection, 0, now, deflected=True)
            done |= self.header_fields(src.client, persona)
            self.transport.send(src.client, done | {"scene": scene.id, "speaker": pick.speaker, "to": pick.to})
            return
        deadline = now + msg["deadline_ms"] / 1000 if msg["deadline_ms"] is not None else None
        self.arrivals += 1
        call = Call(src.client, mid, f"r{self.arrivals}", persona, None, text, msg["stream"], now, deadline,
                    prompt.ids, prompt.prefix_len, params, self.new_line(persona), priority=priority,
                    arrival=self.arrivals, history_cut=prompt.turns_left_out > 0,
                    scene=(src.user, scene.id, pick.speaker, pick.to))
        self.calls.add(call, None)

    def scene_line_ended(self, call: Call, terminal: dict | None) -> None:
        """`call`, a scene line, ended with `terminal` (None: dropped without a reply): the scene takes it."""
        scope, scene_id, speaker, to = call.scene
        scene = self.scenes.scenes.get((scope, scene_id))
        said = terminal is not None and terminal["type"] == "done" and not terminal["cancelled"]
        if scene is not None and scene.flight is not None and (scene.flight.client, scene.flight.id) == call.key:
            scene.line_ended(terminal["text"] if said else None)
        if terminal is not None and terminal["type"] == "done":
            terminal.update(scene=scene_id, speaker=speaker, to=to)
