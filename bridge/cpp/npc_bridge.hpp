// npc_bridge.hpp: header-only C++17 client of the npc-engine service (protocol 1.1, see
// bridge/PROTOCOL.md). Needs libzmq, cppzmq and msgpack-cxx (Debian: libzmq3-dev cppzmq-dev
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
#include <vector>

namespace npc {

inline constexpr const char* kTag = "NPC1";
inline constexpr int kMajor = 1;
inline constexpr int kMinor = 1;
inline constexpr const char* kDefaultAddr = "tcp://127.0.0.1:5555";

struct Stats {
  std::optional<double> ttft_ms;  // nil when no token was generated
  double total_ms = 0;
  int64_t drafted = 0;
  int64_t accepted = 0;
  int64_t target_forwards = 0;
  int64_t cached_prefix_tokens = 0;
  int64_t prompt_tokens = 0;
};

// One message from the service or one client-side event. Fields not carried by `type` keep
// their defaults.
struct Event {
  std::string type;              // token, done, error, welcome, pong, npcs, connection
  std::string id;                // empty when the message's id was nil
  int64_t seq = -1;              // token
  std::string text;              // token, done
  int64_t tokens = 0;            // done
  bool fallback = false;         // done: text is the persona's fallback line (deadline missed)
  bool cancelled = false;        // done: ended by cancel()
  bool deflected = false;        // done: text is the persona's deflection line (banned topic)
  Stats stats;                   // done
  std::string code, message;     // error
  std::vector<std::string> npcs; // welcome, npcs: persona ids
  std::vector<std::string> caps; // welcome
  std::map<std::string, int64_t> limits;  // welcome
  std::string instance;          // welcome, pong
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

struct ClientOptions {
  std::string name = "bridge-cpp";
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
  MapWriter& version(const char* key) {
    packer_.pack(key);
    packer_.pack_array(2);
    packer_.pack(kMajor);
    packer_.pack(kMinor);
    return *this;
  }
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
    std::string id = o.id.empty() ? new_id() : o.id;
    detail::check_text("id", id, 1, 128);
    if (id[0] == '~') throw std::invalid_argument("id must not start with '~' (reserved for the client's own probes)");
    if (pending_.count(id)) throw std::invalid_argument("request " + id + " is still running");
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
    auto now = detail::Clock::now();
    Pending p{now, std::nullopt, std::nullopt};
    if (o.deadline_ms && o.open)
      p.open_deadline_ms = *o.deadline_ms;
    else if (o.deadline_ms)
      p.expires_at = expiry(now, *o.deadline_ms);
    pending_[id] = p;
    abandoned_set_.erase(id);
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

  std::string request(const char* type, const std::string& id) {
    detail::MapWriter w(2);
    w.str("type", type).str("id", id);
    send(w.buffer());
    return id;
  }

  std::string request_hello(const std::string& id) {
    detail::MapWriter w(4);
    w.str("type", "hello").str("id", id).version("protocol").str("client", options_.name);
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
