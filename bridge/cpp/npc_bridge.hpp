// npc_bridge.hpp: header-only C++17 client of the npc-engine service (protocol 1.1, or 1.2 when
// asked for; see bridge/PROTOCOL.md). Needs libzmq, cppzmq and msgpack-cxx (Debian: libzmq3-dev cppzmq-dev
// libmsgpack-cxx-dev); link with -lzmq.
//
//   npc::Client client("tcp://127.0.0.1:5555");
//   std::string id = client.say("blacksmith", "Can you mend my sword?");
//   // once per frame:
//   for (const npc::Event& e : client.poll(1.0)) { ... }   // never blocks longer than 1 ms
//
// A Client owns one ZeroMQ socket: use it from one thread only. poll() returns the service's
// messages plus this client's own events (synthetic = true): "connection" when the service is
// first heard from or lost, and "error" with code "disconnected" or "timeout" for requests that
// will never be answered. Every say() id gets exactly one terminal event ("done" or "error").
//
// While the player is still typing, send the line in pieces so the service prefills it early:
//   npc::SayOptions o; o.open = true;
//   std::string id = client.say("blacksmith", "Can you", o);
//   client.append(id, " mend");
//   client.append(id, " my sword?", /*final=*/true);   // the NPC starts answering now
//
// Protocol 1.2 (save files, memories, scenes) is spoken only when the game names the caps it uses:
//   npc::ClientOptions o; o.caps = {"memory", "scene"};
//   npc::Client client(addr, o);                      // hello asks for 1.2; without caps: 1.1 as before
//   client.export_session("slot1");                   // -> "session.blob" event, e.blob goes in the save
//   client.import_session(blob);                      // -> "session.imported" (or error bad_blob, ...)
//   client.add_memory("blacksmith", "slot1", "The player saved my daughter.");  // -> "memory.added"
//   client.open_scene("tavern", {"host", "bard"}, "A busy tavern evening.");    // -> "scene.state"
//   std::string line = client.scene_say("tavern", "Evening, all!");  // -> "line" (speaker, to), tokens, done
// These calls throw std::invalid_argument until a welcome of protocol 1.2 that lists their cap arrived.
//
// Strings are UTF-8; say() and append() throw std::invalid_argument for what the service would
// refuse as a whole message (invalid UTF-8, an id out of range), since no reply could name it.
// CURVE: set ClientOptions::curve_server_key, curve_public_key and curve_secret_key (Z85).
// bridge/c/ wraps this client in a C ABI (a shared library) for other languages and engines.
#pragma once

#ifndef MSGPACK_NO_BOOST
#define MSGPACK_NO_BOOST
#endif
#include <msgpack.hpp>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <variant>
#include <vector>

namespace npc {

inline constexpr const char* kTag = "NPC1";
inline constexpr int kMajor = 1;
inline constexpr int kMinor = 1;
inline constexpr const char* kDefaultAddr = "tcp://127.0.0.1:5555";

inline constexpr int kMinorWithState = 2;  // memory and scene need protocol 1.2

struct Stats {
  std::optional<double> ttft_ms;  // nil when no token was generated
  double total_ms = 0;
  int64_t drafted = 0;
  int64_t accepted = 0;
  int64_t target_forwards = 0;
  int64_t cached_prefix_tokens = 0;
  int64_t prompt_tokens = 0;
};

struct Memory {      // memories
  int64_t memory_id = 0;
  std::string text;
};

struct ItineraryItem {  // scene.open, scene.state
  std::string text;
  std::string at;  // a game time as the host would say it; empty: none
};

struct Guest {  // scene.open, scene.state
  std::string name;
  std::string rsvp = "no_answer";  // "coming", "not_coming", "no_answer"
  std::string role;                // scene.open: how the host introduces them
  std::string npc;                 // a persona id: present while that NPC is in the cast; empty: none
  bool present = false;            // scene.state
};

struct SceneLine {  // scene.state: speaking (with id) and transcript (with text)
  std::string id, speaker, to, text;  // speaker "player", or "" for a game event
};

struct SceneState {
  std::string scene, host, situation;  // host empty: none
  std::vector<std::string> cast, present, missing;
  std::vector<ItineraryItem> itinerary;
  int64_t position = 0;  // itinerary items moved to so far
  std::vector<Guest> guests;
  std::optional<SceneLine> speaking;  // the line in flight
  std::vector<SceneLine> transcript;  // oldest first
};

// One message from the service or one client-side event. Fields not carried by `type` keep
// their defaults.
struct Event {
  std::string type;              // token, done, error, welcome, pong, npcs, connection; 1.2: session.blob,
                                 // session.imported, memory.added, memories, memory.forgotten, line,
                                 // scene.state, scene.closed
  std::string id;                // empty when the message's id was nil
  int64_t seq = -1;              // token
  std::string text;              // token, done
  int64_t tokens = 0;            // done
  bool fallback = false;         // done: text is the persona's fallback line (deadline missed)
  bool cancelled = false;        // done: ended by cancel()
  bool deflected = false;        // done: text is the persona's deflection line (banned topic)
  bool history_cut = false;      // done (1.2): the oldest turns were left out of the prompt
  std::string emotion, action;   // done (1.2, cap "emotion"): of a line of an NPC that lists emotions; else empty
  Stats stats;                   // done
  std::string code, message;     // error
  std::vector<std::string> npcs; // welcome, npcs, session.imported: persona ids
  std::vector<std::string> caps; // welcome
  std::map<std::string, int64_t> limits;  // welcome
  std::string instance;          // welcome, pong
  int minor = -1;                // welcome: the minor protocol version both sides now speak
  std::string blob;              // session.blob: bytes to keep in the save file as is
  int64_t memory_id = 0;         // memory.added (text: the memory as kept)
  std::vector<Memory> memories;  // memories, oldest first
  int64_t forgotten = 0;         // memory.forgotten
  std::string scene;             // line, done of a line, scene.state, scene.closed
  std::string speaker, to;       // line, done of a line: persona id; to: persona id, "player" or "all"
  std::string cue;               // line: what the host does ("welcome", "introduce", "item"), or empty
  std::optional<int64_t> item;   // line: the itinerary item announced
  std::optional<SceneState> state;  // scene.state
  bool connected = false;        // connection
  bool synthetic = false;        // made by this client, not sent by the service
  bool terminal() const { return type == "done" || type == "error"; }
};

struct SayOptions {
  std::string session = "default";
  std::optional<int64_t> max_tokens;
  std::optional<double> temperature;
  std::optional<int64_t> seed;
  std::optional<double> deadline_ms;
  std::string priority = "player";  // or "ambient"
  bool stream = true;
  bool open = false;  // the player is still typing: text is the first piece; send the rest with append()
  std::string id;     // empty: the client makes one
};

// A scene line's options (scene_say, scene_next); its priority is the service's (player / ambient).
struct LineOptions {
  std::string to;       // scene_say: the cast member addressed; scene_next: also "player" or "all"; empty: any
  std::string speaker;  // scene_next: the cast member who speaks; empty: the scene picks
  std::optional<int64_t> max_tokens;
  std::optional<double> temperature;
  std::optional<int64_t> seed;
  std::optional<double> deadline_ms;
  bool stream = true;
  std::string id;  // empty: the client makes one
};

struct SceneOptions {  // scene_open
  std::string host;    // a cast member who runs the itinerary and the guest list; empty: none
  std::vector<ItineraryItem> itinerary;  // needs a host
  std::vector<Guest> guests;
  bool player = true;  // the player is in the scene
  std::string player_role;  // how the host introduces the player
};

struct SceneEvent {  // scene_event: at least one of these
  std::string text;    // what happened, into the transcript
  std::string arrive;  // a guest's name or "player" walks in
  std::string leave;   // a guest's name or "player" leaves
  std::variant<std::monostate, std::string, int64_t> itinerary;  // "next", or the item to move to
};

struct ClientOptions {
  std::string name = "bridge-cpp";
  // The protocol 1.2 caps the game uses ("memory", "scene", "emotion"): hello then asks for protocol 1.2 and
  // names them.
  // Empty: hello asks for 1.1 and the client behaves exactly as a 1.1 client.
  std::vector<std::string> caps;
  double ping_interval_s = 1.0;      // ping after this much silence
  double heartbeat_timeout_s = 3.0;  // lost when a ping stays unanswered this long
  double deadline_grace_ms = 1000;   // synthetic "timeout" this long after a missed deadline
  // CURVE (section 10 of PROTOCOL.md): the service's public key and this client's key pair, each
  // 40 Z85 characters (zmq.auth certificates); all empty: no CURVE.
  std::string curve_server_key, curve_public_key, curve_secret_key;
};

namespace detail {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t, Clock::time_point now) {
  return std::chrono::duration<double>(now - t).count();
}

inline const msgpack::object* find(const msgpack::object& map, const char* key) {
  for (uint32_t i = 0; i < map.via.map.size; ++i) {
    const msgpack::object_kv& kv = map.via.map.ptr[i];
    if (kv.key.type == msgpack::type::STR && kv.key.via.str.size == std::strlen(key) &&
        std::memcmp(kv.key.via.str.ptr, key, kv.key.via.str.size) == 0)
      return &kv.val;
  }
  return nullptr;
}

inline std::string get_string(const msgpack::object& map, const char* key) {
  const msgpack::object* v = find(map, key);
  return v && v->type == msgpack::type::STR ? std::string(v->via.str.ptr, v->via.str.size) : std::string();
}

inline std::string get_bytes(const msgpack::object& map, const char* key) {
  const msgpack::object* v = find(map, key);
  return v && v->type == msgpack::type::BIN ? std::string(v->via.bin.ptr, v->via.bin.size) : std::string();
}

inline std::optional<double> as_number(const msgpack::object* v) {
  if (!v) return std::nullopt;
  switch (v->type) {
    case msgpack::type::POSITIVE_INTEGER: return static_cast<double>(v->via.u64);
    case msgpack::type::NEGATIVE_INTEGER: return static_cast<double>(v->via.i64);
    case msgpack::type::FLOAT32:
    case msgpack::type::FLOAT64: return v->via.f64;
    default: return std::nullopt;
  }
}

inline std::optional<double> get_number(const msgpack::object& map, const char* key) { return as_number(find(map, key)); }

inline int64_t get_int(const msgpack::object& map, const char* key, int64_t fallback) {
  std::optional<double> v = get_number(map, key);
  return v ? static_cast<int64_t>(*v) : fallback;
}

// Code points in s, or -1 when s is not valid UTF-8 (overlong forms, surrogates and values past
// U+10FFFF are invalid too: the service would reject the whole message).
inline int64_t utf8_length(const std::string& s) {
  int64_t n = 0;
  for (size_t i = 0; i < s.size(); ++n) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    size_t extra = c < 0x80 ? 0 : (c >> 5) == 0x6 ? 1 : (c >> 4) == 0xe ? 2 : (c >> 3) == 0x1e ? 3 : 4;
    if (extra == 4 || s.size() - i <= extra) return -1;  // a bad lead byte, or cut short
    uint32_t cp = extra == 0 ? c : c & (0x3f >> extra);
    for (size_t k = 1; k <= extra; ++k) {
      unsigned char cc = static_cast<unsigned char>(s[i + k]);
      if ((cc >> 6) != 0x2) return -1;
      cp = (cp << 6) | (cc & 0x3f);
    }
    static const uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[extra] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return -1;
    i += extra + 1;
  }
  return n;
}

inline void check_text(const char* name, const std::string& s, int64_t min_chars, int64_t max_chars) {
  int64_t n = utf8_length(s);
  if (n < 0) throw std::invalid_argument(std::string(name) + " is not valid UTF-8");
  if (n < min_chars || n > max_chars)
    throw std::invalid_argument(std::string(name) + " must be " + std::to_string(min_chars) + " to " +
                                std::to_string(max_chars) + " characters");
}

inline bool get_bool(const msgpack::object& map, const char* key) {
  const msgpack::object* v = find(map, key);
  return v && v->type == msgpack::type::BOOLEAN && v->via.boolean;
}

// Strings of an array of strings (welcome), or the "id" of each map of an array of maps (npcs).
inline std::vector<std::string> get_ids(const msgpack::object& map, const char* key) {
  std::vector<std::string> out;
  const msgpack::object* v = find(map, key);
  if (!v || v->type != msgpack::type::ARRAY) return out;
  for (uint32_t i = 0; i < v->via.array.size; ++i) {
    const msgpack::object& item = v->via.array.ptr[i];
    if (item.type == msgpack::type::STR) out.emplace_back(item.via.str.ptr, item.via.str.size);
    if (item.type == msgpack::type::MAP) out.push_back(get_string(item, "id"));
  }
  return out;
}

// The maps of an array of maps, each read by `read`.
template <typename T, typename Read>
std::vector<T> get_maps(const msgpack::object& map, const char* key, Read read) {
  std::vector<T> out;
  const msgpack::object* v = find(map, key);
  if (!v || v->type != msgpack::type::ARRAY) return out;
  for (uint32_t i = 0; i < v->via.array.size; ++i)
    if (v->via.array.ptr[i].type == msgpack::type::MAP) out.push_back(read(v->via.array.ptr[i]));
  return out;
}

inline SceneLine read_scene_line(const msgpack::object& m) {
  return {get_string(m, "id"), get_string(m, "speaker"), get_string(m, "to"), get_string(m, "text")};
}

inline SceneState read_scene_state(const msgpack::object& m) {
  SceneState s;
  s.scene = get_string(m, "scene");
  s.host = get_string(m, "host");
  s.situation = get_string(m, "situation");
  s.cast = get_ids(m, "cast");
  s.present = get_ids(m, "present");
  s.missing = get_ids(m, "missing");
  s.position = get_int(m, "position", 0);
  s.itinerary = get_maps<ItineraryItem>(m, "itinerary", [](const msgpack::object& item) {
    return ItineraryItem{get_string(item, "text"), get_string(item, "at")};
  });
  s.guests = get_maps<Guest>(m, "guests", [](const msgpack::object& g) {
    return Guest{get_string(g, "name"), get_string(g, "rsvp"), get_string(g, "role"), get_string(g, "npc"),
                 get_bool(g, "present")};
  });
  if (const msgpack::object* v = find(m, "speaking"); v && v->type == msgpack::type::MAP) s.speaking = read_scene_line(*v);
  s.transcript = get_maps<SceneLine>(m, "transcript", read_scene_line);
  return s;
}

inline std::map<std::string, int64_t> get_limits(const msgpack::object& map) {
  std::map<std::string, int64_t> out;
  const msgpack::object* v = find(map, "limits");
  if (!v || v->type != msgpack::type::MAP) return out;
  for (uint32_t i = 0; i < v->via.map.size; ++i) {
    const msgpack::object_kv& kv = v->via.map.ptr[i];
    if (kv.key.type != msgpack::type::STR) continue;
    if (std::optional<double> n = as_number(&kv.val))
      out[std::string(kv.key.via.str.ptr, kv.key.via.str.size)] = static_cast<int64_t>(*n);
  }
  return out;
}

// Writes one msgpack map; the number of pairs is counted first so fields can be optional.
class MapWriter {
 public:
  explicit MapWriter(uint32_t pairs) : packer_(buffer_) { packer_.pack_map(pairs); }
  MapWriter& str(const char* key, const std::string& value) { packer_.pack(key); packer_.pack(value); return *this; }
  MapWriter& num(const char* key, double value) { packer_.pack(key); packer_.pack(value); return *this; }
  MapWriter& integer(const char* key, int64_t value) { packer_.pack(key); packer_.pack(value); return *this; }
  MapWriter& boolean(const char* key, bool value) { packer_.pack(key); packer_.pack(value); return *this; }
  MapWriter& version(const char* key, int minor) {
    packer_.pack(key);
    packer_.pack_array(2);
    packer_.pack(kMajor);
    packer_.pack(minor);
    return *this;
  }
  MapWriter& bin(const char* key, const std::string& bytes) {
    packer_.pack(key);
    packer_.pack_bin(static_cast<uint32_t>(bytes.size()));
    packer_.pack_bin_body(bytes.data(), static_cast<uint32_t>(bytes.size()));
    return *this;
  }
  MapWriter& strings(const char* key, const std::vector<std::string>& values) {
    packer_.pack(key);
    packer_.pack(values);
    return *this;
  }
  msgpack::packer<msgpack::sbuffer>& raw(const char* key) { packer_.pack(key); return packer_; }
  const msgpack::sbuffer& buffer() const { return buffer_; }

 private:
  msgpack::sbuffer buffer_;
  msgpack::packer<msgpack::sbuffer> packer_;
};

}  // namespace detail

class Client {
 public:
  explicit Client(std::string addr = kDefaultAddr, ClientOptions options = {})
      : addr_(std::move(addr)), options_(std::move(options)), context_(1) {
    std::random_device rd;
    char prefix[16];
    std::snprintf(prefix, sizeof prefix, "%06x-", static_cast<unsigned>(rd()) & 0xffffffu);
    prefix_ = prefix;
    open();
  }

  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // True once the service has answered and until it is considered lost.
  bool connected() const { return connected_; }
  // The latest welcome (limits, npcs, caps): valid once connected() has been true.
  const Event& server() const { return server_; }

  // Ask `npc` for a line; returns the request id. Arguments the service would reject as a whole
  // message (so that no reply could name the request) throw std::invalid_argument; strings are UTF-8.
  std::string say(const std::string& npc, const std::string& text, const SayOptions& o = {}) {
    if (o.priority != "player" && o.priority != "ambient")
      throw std::invalid_argument("priority must be \"player\" or \"ambient\"");
    detail::check_text("npc", npc, 1, 64);
    detail::check_text("session", o.session, 1, 128);
    detail::check_text("text", text, 0, std::numeric_limits<int64_t>::max());
    std::string id = start_id(o.id);
    if (o.open && !serves_append())
      throw std::invalid_argument("the service does not serve open says (no \"append\" in welcome.caps)");
    uint32_t pairs = 7 + o.max_tokens.has_value() + o.temperature.has_value() + o.seed.has_value() +
                     o.deadline_ms.has_value() + o.open;
    detail::MapWriter w(pairs);
    w.str("type", "say").str("id", id).str("npc", npc).str("session", o.session).str("text", text)
        .str("priority", o.priority).boolean("stream", o.stream);
    if (o.max_tokens) w.integer("max_tokens", *o.max_tokens);
    if (o.temperature) w.num("temperature", *o.temperature);
    if (o.seed) w.integer("seed", *o.seed);
    if (o.deadline_ms) w.num("deadline_ms", *o.deadline_ms);
    if (o.open) {
      w.boolean("open", true);
      open_.insert(id);
    }
    track(id, o.deadline_ms, o.open);
    send(w.buffer());
    return id;
  }

  // Send the next piece of the open say `id`, appended verbatim (include the spaces between words);
  // final = true completes the line and the NPC starts answering. No event answers it. A say that
  // has already ended is left alone; one that is running but not open throws std::invalid_argument.
  void append(const std::string& id, const std::string& text, bool final = false) {
    if (!pending_.count(id)) return;
    if (!open_.count(id)) throw std::invalid_argument("request " + id + " is not open");
    detail::check_text("text", text, 0, std::numeric_limits<int64_t>::max());
    if (final) {
      open_.erase(id);
      Pending& p = pending_[id];
      if (p.open_deadline_ms) p.expires_at = expiry(detail::Clock::now(), *p.open_deadline_ms);
    }
    detail::MapWriter w(4);
    w.str("type", "say.append").str("id", id).str("text", text).boolean("final", final);
    send(w.buffer());
  }

  // Stop a running request; it ends with done (cancelled = true) unless it was already ending.
  void cancel(const std::string& id) {
    if (!pending_.count(id)) return;
    detail::MapWriter w(2);
    w.str("type", "cancel").str("id", id);
    send(w.buffer());
  }

  // hello (answered by welcome), ping (pong), npcs (npcs); return the request id, made by the
  // client when `id` is empty.
  std::string hello(const std::string& id = {}) { return request_hello(id.empty() ? new_id() : id); }
  std::string ping(const std::string& id = {}) { return request("ping", id.empty() ? new_id() : id); }
  std::string npcs(const std::string& id = {}) { return request("npcs", id.empty() ? new_id() : id); }

  // Conversation state (protocol 1.2, cap "memory"); each returns the request id its reply names.
  // The save-file blob of `session`: one NPC's conversation, or with npc empty every NPC's ("session.blob").
  std::string export_session(const std::string& session, const std::string& npc = {}) {
    require("memory");
    detail::check_text("session", session, 1, 128);
    if (!npc.empty()) detail::check_text("npc", npc, 1, 64);
    std::string id = new_id();
    detail::MapWriter w(3 + !npc.empty());
    w.str("type", "session.export").str("id", id).str("session", session);
    if (!npc.empty()) w.str("npc", npc);
    send(w.buffer());
    return id;
  }

  // Restore a blob of export_session (into `session`, else the one it came from): "session.imported", or an
  // error (bad_blob, blob_version, too_large) that changed nothing.
  std::string import_session(const std::string& blob, const std::string& session = {}) {
    require("memory");
    if (!session.empty()) detail::check_text("session", session, 1, 128);
    std::string id = new_id();
    detail::MapWriter w(3 + !session.empty());
    w.str("type", "session.import").str("id", id).bin("blob", blob);
    if (!session.empty()) w.str("session", session);
    send(w.buffer());
    return id;
  }

  // Something `npc` remembers about this player, in every prompt of the conversation: "memory.added".
  std::string add_memory(const std::string& npc, const std::string& session, const std::string& text) {
    detail::check_text("text", text, 1, std::numeric_limits<int64_t>::max());
    return memory_request("memory.add", npc, session, [&](detail::MapWriter& w) { w.str("text", text); }, 1);
  }

  // "memories": the conversation's memories, oldest first.
  std::string list_memories(const std::string& npc, const std::string& session) {
    return memory_request("memory.list", npc, session, [](detail::MapWriter&) {}, 0);
  }

  // Forget one memory, or every one with memory_id empty: "memory.forgotten" (how many).
  std::string forget_memory(const std::string& npc, const std::string& session,
                            std::optional<int64_t> memory_id = std::nullopt) {
    return memory_request("memory.forget", npc, session, [&](detail::MapWriter& w) {
      if (memory_id) w.integer("memory_id", *memory_id);
    }, memory_id.has_value());
  }

  // Scenes (protocol 1.2, cap "scene"). open_scene, scene_event, scene_cast and scene_state are answered by
  // "scene.state", close_scene by "scene.closed".
  std::string open_scene(const std::string& scene, const std::vector<std::string>& cast, const std::string& situation,
                         const SceneOptions& o = {}) {
    require("scene");
    check_scene(scene);
    for (const std::string& npc : cast) detail::check_text("cast", npc, 1, 64);
    detail::check_text("situation", situation, 1, 500);
    std::string id = new_id();
    detail::MapWriter w(6 + !o.host.empty() + !o.itinerary.empty() + !o.guests.empty() + !o.player_role.empty());
    w.str("type", "scene.open").str("id", id).str("scene", scene).strings("cast", cast).str("situation", situation)
        .boolean("player", o.player);
    if (!o.host.empty()) w.str("host", o.host);
    if (!o.player_role.empty()) w.str("player_role", o.player_role);
    if (!o.itinerary.empty()) {
      msgpack::packer<msgpack::sbuffer>& pk = w.raw("itinerary");
      pk.pack_array(static_cast<uint32_t>(o.itinerary.size()));
      for (const ItineraryItem& item : o.itinerary) {
        detail::check_text("itinerary text", item.text, 0, std::numeric_limits<int64_t>::max());
        detail::check_text("itinerary at", item.at, 0, std::numeric_limits<int64_t>::max());
        pk.pack_map(1 + !item.at.empty());
        pk.pack("text");
        pk.pack(item.text);
        if (!item.at.empty()) {
          pk.pack("at");
          pk.pack(item.at);
        }
      }
    }
    if (!o.guests.empty()) {
      msgpack::packer<msgpack::sbuffer>& pk = w.raw("guests");
      pk.pack_array(static_cast<uint32_t>(o.guests.size()));
      for (const Guest& g : o.guests) {
        for (const std::string* f : {&g.name, &g.rsvp, &g.role, &g.npc}) detail::check_text("guest", *f, 0, 200);
        pk.pack_map(3 + !g.npc.empty());
        pk.pack("name");
        pk.pack(g.name);
        pk.pack("rsvp");
        pk.pack(g.rsvp);
        pk.pack("role");
        pk.pack(g.role);
        if (!g.npc.empty()) {
          pk.pack("npc");
          pk.pack(g.npc);
        }
      }
    }
    send(w.buffer());
    return id;
  }

  // The player speaks into `scene` (o.to: to one cast member); returns the id of the line that answers: a
  // "line" event (speaker, to), tokens, exactly one terminal event, as for say(). It interrupts the scene's
  // line in flight, which ends with done (cancelled = true).
  std::string scene_say(const std::string& scene, const std::string& text, const LineOptions& o = {}) {
    detail::check_text("text", text, 1, std::numeric_limits<int64_t>::max());
    return scene_line("scene.say", scene, o, [&](detail::MapWriter& w) { w.str("text", text); }, 1);
  }

  // The scene's next line, the NPCs talking on their own (o.speaker: who speaks); events as for scene_say, or
  // an error scene_busy while a line of the scene is in flight.
  std::string scene_next(const std::string& scene, const LineOptions& o = {}) {
    if (!o.speaker.empty()) detail::check_text("speaker", o.speaker, 1, 64);
    return scene_line("scene.next", scene, o, [&](detail::MapWriter& w) {
      if (!o.speaker.empty()) w.str("speaker", o.speaker);
    }, !o.speaker.empty());
  }

  // Tell `scene` what happened (text, a guest or "player" arriving or leaving, the itinerary moving on).
  std::string scene_event(const std::string& scene, const SceneEvent& e) {
    require("scene");
    check_scene(scene);
    for (const std::string* f : {&e.text, &e.arrive, &e.leave}) detail::check_text("scene event", *f, 0, 500);
    bool moves = !std::holds_alternative<std::monostate>(e.itinerary);
    std::string id = new_id();
    detail::MapWriter w(3 + !e.text.empty() + !e.arrive.empty() + !e.leave.empty() + moves);
    w.str("type", "scene.event").str("id", id).str("scene", scene);
    if (!e.text.empty()) w.str("text", e.text);
    if (!e.arrive.empty()) w.str("arrive", e.arrive);
    if (!e.leave.empty()) w.str("leave", e.leave);
    if (const std::string* next = std::get_if<std::string>(&e.itinerary)) w.str("itinerary", *next);
    if (const int64_t* item = std::get_if<int64_t>(&e.itinerary)) w.integer("itinerary", *item);
    send(w.buffer());
    return id;
  }

  // NPCs join (the host introduces them), then others leave; all of it or nothing.
  std::string scene_cast(const std::string& scene, const std::vector<std::string>& add,
                         const std::vector<std::string>& remove = {}) {
    require("scene");
    check_scene(scene);
    for (const std::string& npc : add) detail::check_text("add", npc, 1, 64);
    for (const std::string& npc : remove) detail::check_text("remove", npc, 1, 64);
    std::string id = new_id();
    detail::MapWriter w(5);
    w.str("type", "scene.cast").str("id", id).str("scene", scene).strings("add", add).strings("remove", remove);
    send(w.buffer());
    return id;
  }

  std::string close_scene(const std::string& scene) { return scene_request("scene.close", scene); }
  std::string scene_state(const std::string& scene) { return scene_request("scene.state", scene); }

  // A request id this client has not used (say() makes one when SayOptions::id is empty).
  std::string new_id() { return prefix_ + std::to_string(counter_++); }

  // Every event available now, reading for at most budget_ms; never waits for messages.
  std::vector<Event> poll(double budget_ms = 1.0) {
    auto start = detail::Clock::now();
    for (;;) {
      std::vector<zmq::message_t> frames;
      zmq::recv_result_t got;
      try {
        got = zmq::recv_multipart(socket_, std::back_inserter(frames), zmq::recv_flags::dontwait);
      } catch (const zmq::error_t&) {
        break;
      }
      if (!got) break;
      receive(frames);
      if (detail::seconds_since(start, detail::Clock::now()) * 1000.0 >= budget_ms) break;
    }
    housekeeping(detail::Clock::now());
    std::vector<Event> out(std::make_move_iterator(events_.begin()), std::make_move_iterator(events_.end()));
    events_.clear();
    return out;
  }

  // Block until a message arrives or timeout_ms passes (for tools and tests; games only poll).
  void wait(long timeout_ms) {
    zmq::pollitem_t item{static_cast<void*>(socket_), 0, ZMQ_POLLIN, 0};
    zmq::poll(&item, 1, std::chrono::milliseconds(timeout_ms));
  }

 private:
  struct Pending {
    detail::Clock::time_point sent_at;
    std::optional<detail::Clock::time_point> expires_at;
    std::optional<double> open_deadline_ms;  // an open say's deadline starts with its final piece
  };

  detail::Clock::time_point expiry(detail::Clock::time_point from, double deadline_ms) const {
    return from + std::chrono::duration_cast<detail::Clock::duration>(
                      std::chrono::duration<double, std::milli>(deadline_ms + options_.deadline_grace_ms));
  }

  // True until a welcome says otherwise: the first say may go out before the service has answered.
  bool serves_append() const {
    // Before the welcome nothing is known: a 1.0 service would answer the first piece as a whole line.
    return std::find(server_.caps.begin(), server_.caps.end(), "append") != server_.caps.end();
  }

  // Memory and scene calls need the game to have asked for their cap and a 1.2 welcome that lists it.
  void require(const char* cap) const {
    if (std::find(options_.caps.begin(), options_.caps.end(), cap) == options_.caps.end())
      throw std::invalid_argument(std::string("add \"") + cap + "\" to ClientOptions::caps to use it (protocol 1.2)");
    if (server_.minor < kMinorWithState ||
        std::find(server_.caps.begin(), server_.caps.end(), cap) == server_.caps.end())
      throw std::invalid_argument(std::string("the service does not serve \"") + cap +
                                  "\" (it needs a welcome of protocol 1.2 listing it: poll until connected)");
  }

  static void check_scene(const std::string& scene) { detail::check_text("scene", scene, 1, 64); }

  std::string memory_request(const char* type, const std::string& npc, const std::string& session,
                             const std::function<void(detail::MapWriter&)>& extra, uint32_t extra_pairs) {
    require("memory");
    detail::check_text("npc", npc, 1, 64);
    detail::check_text("session", session, 1, 128);
    std::string id = new_id();
    detail::MapWriter w(4 + extra_pairs);
    w.str("type", type).str("id", id).str("npc", npc).str("session", session);
    extra(w);
    send(w.buffer());
    return id;
  }

  std::string scene_request(const char* type, const std::string& scene) {
    require("scene");
    check_scene(scene);
    std::string id = new_id();
    detail::MapWriter w(3);
    w.str("type", type).str("id", id).str("scene", scene);
    send(w.buffer());
    return id;
  }

  // A scene line is tracked like a say: one terminal event, a synthetic one when the service is lost.
  std::string scene_line(const char* type, const std::string& scene, const LineOptions& o,
                         const std::function<void(detail::MapWriter&)>& extra, uint32_t extra_pairs) {
    require("scene");
    check_scene(scene);
    if (!o.to.empty()) detail::check_text("to", o.to, 1, 64);
    std::string id = start_id(o.id);
    uint32_t pairs = 4 + extra_pairs + !o.to.empty() + o.max_tokens.has_value() + o.temperature.has_value() +
                     o.seed.has_value() + o.deadline_ms.has_value();
    detail::MapWriter w(pairs);
    w.str("type", type).str("id", id).str("scene", scene).boolean("stream", o.stream);
    extra(w);
    if (!o.to.empty()) w.str("to", o.to);
    if (o.max_tokens) w.integer("max_tokens", *o.max_tokens);
    if (o.temperature) w.num("temperature", *o.temperature);
    if (o.seed) w.integer("seed", *o.seed);
    if (o.deadline_ms) w.num("deadline_ms", *o.deadline_ms);
    track(id, o.deadline_ms, false);
    send(w.buffer());
    return id;
  }

  // The id of a new line: the caller's (checked) or a new one.
  std::string start_id(const std::string& wanted) {
    std::string id = wanted.empty() ? new_id() : wanted;
    detail::check_text("id", id, 1, 128);
    if (id[0] == '~') throw std::invalid_argument("id must not start with '~' (reserved for the client's own probes)");
    if (pending_.count(id)) throw std::invalid_argument("request " + id + " is still running");
    return id;
  }

  void track(const std::string& id, std::optional<double> deadline_ms, bool open) {
    auto now = detail::Clock::now();
    Pending p{now, std::nullopt, std::nullopt};
    if (deadline_ms && open)
      p.open_deadline_ms = *deadline_ms;
    else if (deadline_ms)
      p.expires_at = expiry(now, *deadline_ms);
    pending_[id] = p;
    abandoned_set_.erase(id);
  }

  std::string request(const char* type, const std::string& id) {
    detail::MapWriter w(2);
    w.str("type", type).str("id", id);
    send(w.buffer());
    return id;
  }

  std::string request_hello(const std::string& id) {
    bool state = !options_.caps.empty();  // without caps the hello is exactly a 1.1 client's
    detail::MapWriter w(4 + state);
    w.str("type", "hello").str("id", id).version("protocol", state ? kMinorWithState : kMinor)
        .str("client", options_.name);
    if (state) w.strings("caps", options_.caps);
    send(w.buffer());
    return id;
  }

  void open() {
    socket_ = zmq::socket_t(context_, zmq::socket_type::dealer);
    socket_.set(zmq::sockopt::linger, 0);
    socket_.set(zmq::sockopt::rcvhwm, 0);
    if (!options_.curve_server_key.empty()) {
      socket_.set(zmq::sockopt::curve_serverkey, options_.curve_server_key);
      socket_.set(zmq::sockopt::curve_publickey, options_.curve_public_key);
      socket_.set(zmq::sockopt::curve_secretkey, options_.curve_secret_key);
    }
    // Requests belong to their connection (PROTOCOL.md section 7): when it closes, the service has
    // cancelled them, even if the DEALER reconnects before a ping could notice. The monitor says so.
    std::string monitor = "inproc://npc-bridge-monitor-" + std::to_string(sockets_++);
    if (zmq_socket_monitor(static_cast<void*>(socket_), monitor.c_str(), ZMQ_EVENT_DISCONNECTED) != 0)
      throw zmq::error_t();
    monitor_ = zmq::socket_t(context_, zmq::socket_type::pair);
    monitor_.set(zmq::sockopt::linger, 0);
    monitor_.connect(monitor);
    socket_.connect(addr_);
    auto now = detail::Clock::now();
    last_heard_ = now;
    unanswered_since_.reset();
    probes_.clear();
    probe(true);
  }

  void probe(bool hello) {
    std::string id = "~" + new_id();
    auto now = detail::Clock::now();
    probes_[id] = now;
    last_probe_ = now;
    if (!unanswered_since_) unanswered_since_ = now;
    if (hello) request_hello(id);
    else request("ping", id);
  }

  void send(const msgpack::sbuffer& body) {
    zmq::message_t tag(kTag, 4);
    zmq::message_t payload(body.data(), body.size());
    // A full queue (service unreachable) drops the message; the heartbeat then reports the loss.
    if (socket_.send(tag, zmq::send_flags::sndmore | zmq::send_flags::dontwait))
      socket_.send(payload, zmq::send_flags::dontwait);
  }

  void receive(const std::vector<zmq::message_t>& frames) {
    if (frames.size() != 2 || frames[0].size() != 4 || std::memcmp(frames[0].data(), kTag, 4) != 0) return;
    msgpack::object_handle handle;
    try {
      handle = msgpack::unpack(static_cast<const char*>(frames[1].data()), frames[1].size());
    } catch (const std::exception&) {
      return;  // not a protocol-1 service; nothing to report against
    }
    const msgpack::object& m = handle.get();
    if (m.type != msgpack::type::MAP) return;
    last_heard_ = detail::Clock::now();
    unanswered_since_.reset();
    if (!connected_) set_connected(true);
    Event e = to_event(m);
    if (!e.id.empty() && e.id[0] == '~') {
      on_probe_reply(e);
      return;
    }
    if (e.type == "welcome") server_ = e;
    if (abandoned_set_.count(e.id)) return;
    if (e.terminal()) {
      pending_.erase(e.id);
      open_.erase(e.id);
    }
    events_.push_back(std::move(e));
  }

  static Event to_event(const msgpack::object& m) {
    Event e;
    e.type = detail::get_string(m, "type");
    e.id = detail::get_string(m, "id");
    e.seq = detail::get_int(m, "seq", -1);
    e.text = detail::get_string(m, "text");
    e.tokens = detail::get_int(m, "tokens", 0);
    e.fallback = detail::get_bool(m, "fallback");
    e.cancelled = detail::get_bool(m, "cancelled");
    e.deflected = detail::get_bool(m, "deflected");
    e.code = detail::get_string(m, "code");
    e.message = detail::get_string(m, "message");
    e.instance = detail::get_string(m, "instance");
    e.npcs = detail::get_ids(m, "npcs");
    e.caps = detail::get_ids(m, "caps");
    e.limits = detail::get_limits(m);
    if (const msgpack::object* v = detail::find(m, "protocol"); v && v->type == msgpack::type::ARRAY &&
                                                               v->via.array.size == 2)
      e.minor = static_cast<int>(detail::as_number(&v->via.array.ptr[1]).value_or(-1));
    e.history_cut = detail::get_bool(m, "history_cut");
    e.emotion = detail::get_string(m, "emotion");
    e.action = detail::get_string(m, "action");
    e.blob = detail::get_bytes(m, "blob");
    e.memory_id = detail::get_int(m, "memory_id", 0);
    e.memories = detail::get_maps<Memory>(m, "memories", [](const msgpack::object& item) {
      return Memory{detail::get_int(item, "memory_id", 0), detail::get_string(item, "text")};
    });
    e.forgotten = detail::get_int(m, "forgotten", 0);
    e.scene = detail::get_string(m, "scene");
    e.speaker = detail::get_string(m, "speaker");
    e.to = detail::get_string(m, "to");
    e.cue = detail::get_string(m, "cue");
    if (std::optional<double> item = detail::get_number(m, "item")) e.item = static_cast<int64_t>(*item);
    if (e.type == "scene.state") e.state = detail::read_scene_state(m);
    if (const msgpack::object* s = detail::find(m, "stats"); s && s->type == msgpack::type::MAP) {
      e.stats.ttft_ms = detail::get_number(*s, "ttft_ms");
      e.stats.total_ms = detail::get_number(*s, "total_ms").value_or(0.0);
      e.stats.drafted = detail::get_int(*s, "drafted", 0);
      e.stats.accepted = detail::get_int(*s, "accepted", 0);
      e.stats.target_forwards = detail::get_int(*s, "target_forwards", 0);
      e.stats.cached_prefix_tokens = detail::get_int(*s, "cached_prefix_tokens", 0);
      e.stats.prompt_tokens = detail::get_int(*s, "prompt_tokens", 0);
    }
    return e;
  }

  void on_probe_reply(const Event& e) {
    auto it = probes_.find(e.id);
    if (e.type == "welcome") server_ = e;
    if (it == probes_.end() || e.instance.empty()) return;
    auto sent_at = it->second;
    probes_.erase(it);
    if (!instance_.empty() && e.instance != instance_) {
      // The service restarted: requests sent before this probe went to the old one.
      fail([&](const Pending& p) { return p.sent_at < sent_at; }, "disconnected",
           "the service restarted; the request was lost");
    }
    instance_ = e.instance;
  }

  void housekeeping(detail::Clock::time_point now) {
    if (connection_closed()) {
      if (connected_) set_connected(false);
      fail([](const Pending&) { return true; }, "disconnected", "the connection to the service closed");
    }
    if (unanswered_since_ && detail::seconds_since(*unanswered_since_, now) >= options_.heartbeat_timeout_s) {
      if (connected_) set_connected(false);
      fail([](const Pending&) { return true; }, "disconnected", "no word from the service");
      zmq_socket_monitor(static_cast<void*>(socket_), nullptr, 0);
      monitor_.close();
      socket_.close();
      open();  // a fresh socket drops messages queued for the lost connection
      return;
    }
    if (detail::seconds_since(last_heard_, now) >= options_.ping_interval_s &&
        detail::seconds_since(last_probe_, now) >= options_.ping_interval_s)
      probe(false);
    fail([&](const Pending& p) { return p.expires_at && now >= *p.expires_at; }, "timeout", "no reply by the deadline");
  }

  // Drains the monitor (it reports only ZMQ_EVENT_DISCONNECTED); true when it reported anything.
  bool connection_closed() {
    bool closed = false;
    for (;;) {
      std::vector<zmq::message_t> frames;
      zmq::recv_result_t got;
      try {
        got = zmq::recv_multipart(monitor_, std::back_inserter(frames), zmq::recv_flags::dontwait);
      } catch (const zmq::error_t&) {
        break;
      }
      if (!got) break;
      closed = true;
    }
    return closed;
  }

  void set_connected(bool value) {
    connected_ = value;
    Event e;
    e.type = "connection";
    e.connected = value;
    e.synthetic = true;
    events_.push_back(std::move(e));
  }

  void fail(const std::function<bool(const Pending&)>& which, const char* code, const char* message) {
    std::vector<std::string> ids;
    for (const auto& [id, p] : pending_)
      if (which(p)) ids.push_back(id);
    for (const std::string& id : ids) {
      pending_.erase(id);
      open_.erase(id);
      abandon(id);
      Event e;
      e.type = "error";
      e.id = id;
      e.code = code;
      e.message = message;
      e.synthetic = true;
      events_.push_back(std::move(e));
    }
  }

  void abandon(const std::string& id) {
    if (abandoned_set_.insert(id).second) abandoned_.push_back(id);
    while (abandoned_.size() > 4096) {
      abandoned_set_.erase(abandoned_.front());
      abandoned_.pop_front();
    }
  }

  std::string addr_;
  ClientOptions options_;
  zmq::context_t context_;
  zmq::socket_t socket_;
  zmq::socket_t monitor_;  // after socket_: closed before it
  uint64_t sockets_ = 0;   // sockets opened, to name each one's monitor
  std::string prefix_;
  uint64_t counter_ = 0;
  bool connected_ = false;
  Event server_;
  std::string instance_;
  std::unordered_map<std::string, Pending> pending_;
  std::unordered_set<std::string> open_;  // say ids still waiting for their final piece
  std::unordered_map<std::string, detail::Clock::time_point> probes_;
  std::deque<std::string> abandoned_;
  std::unordered_set<std::string> abandoned_set_;
  std::vector<Event> events_;
  detail::Clock::time_point last_heard_, last_probe_;
  std::optional<detail::Clock::time_point> unanswered_since_;
};

}  // namespace npc
