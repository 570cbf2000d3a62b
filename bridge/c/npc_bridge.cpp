// The C ABI of npc_bridge.h over npc::Client (bridge/cpp/npc_bridge.hpp). Every entry point
// catches everything: no C++ exception crosses the boundary.
#include "npc_bridge.h"

#include "npc_bridge.hpp"

#include <cmath>
#include <deque>
#include <memory>
#include <new>
#include <string>

struct npc_client {
  npc::Client client;
  double budget_ms;
  std::deque<npc::Event> ready;  // polled, not yet taken by npc_next_event
};

struct npc_event {
  npc::Event event;
};

namespace {

thread_local std::string last_error;

npc_status fail(npc_status status, const std::string& message) {
  last_error = message;
  return status;
}

// Runs body, turning exceptions into statuses; body returns its own status on success paths.
template <typename Body>
npc_status guarded(Body&& body) {
  try {
    last_error.clear();
    return body();
  } catch (const std::invalid_argument& e) {
    return fail(NPC_ERR_ARGUMENT, e.what());
  } catch (const zmq::error_t& e) {
    return fail(NPC_ERR_TRANSPORT, e.what());
  } catch (const std::bad_alloc&) {
    return fail(NPC_ERR_INTERNAL, "out of memory");
  } catch (const std::exception& e) {
    return fail(NPC_ERR_INTERNAL, e.what());
  } catch (...) {
    return fail(NPC_ERR_INTERNAL, "unknown fault");
  }
}

std::string text_or(const char* s, const char* fallback) { return s ? s : fallback; }

npc_status copy_id(const std::string& id, char* out, size_t size) {
  if (!out) return NPC_OK;
  if (id.size() + 1 > size)
    return fail(NPC_ERR_BUFFER, "id_out needs " + std::to_string(id.size() + 1) + " bytes");
  std::memcpy(out, id.c_str(), id.size() + 1);
  return NPC_OK;
}

// Picks the request id first, so that a too small id_out fails before anything is sent.
template <typename Send>
npc_status request(npc_client* c, char* id_out, size_t id_out_size, Send&& send) {
  return guarded([&] {
    if (!c) return fail(NPC_ERR_ARGUMENT, "client is NULL");
    std::string id = c->client.new_id();
    if (npc_status s = copy_id(id, id_out, id_out_size)) return s;
    send(id);
    return NPC_OK;
  });
}

const std::vector<std::string>* list_of(const npc_event* e, int32_t list) {
  if (!e) return nullptr;
  if (list == NPC_LIST_NPCS) return &e->event.npcs;
  if (list == NPC_LIST_CAPS) return &e->event.caps;
  return nullptr;
}

}  // namespace

extern "C" {

int32_t npc_abi_version(void) { return NPC_ABI_VERSION; }

const char* npc_last_error(void) { return last_error.c_str(); }

void npc_options_init(npc_options* o) {
  if (!o) return;
  *o = npc_options{};
  o->size = sizeof *o;
  npc::ClientOptions defaults;
  o->budget_ms = 1.0;
  o->ping_interval_s = defaults.ping_interval_s;
  o->heartbeat_timeout_s = defaults.heartbeat_timeout_s;
  o->deadline_grace_ms = defaults.deadline_grace_ms;
}

void npc_say_options_init(npc_say_options* o) {
  if (!o) return;
  *o = npc_say_options{};
  o->size = sizeof *o;
  o->seed = -1;
  o->temperature = -1;
  o->stream = 1;
}

npc_status npc_connect(const npc_options* options, npc_client** out) {
  return guarded([&] {
    if (!out) return fail(NPC_ERR_ARGUMENT, "out is NULL");
    *out = nullptr;
    npc_options o;
    npc_options_init(&o);
    if (options && options->size != sizeof o)
      return fail(NPC_ERR_ARGUMENT, "npc_options.size is not sizeof(npc_options): header and library differ");
    if (options) o = *options;
    npc::ClientOptions co;
    co.name = text_or(o.client_name, "bridge-c");
    co.ping_interval_s = o.ping_interval_s;
    co.heartbeat_timeout_s = o.heartbeat_timeout_s;
    co.deadline_grace_ms = o.deadline_grace_ms;
    co.curve_server_key = text_or(o.curve_server_key, "");
    co.curve_public_key = text_or(o.curve_public_key, "");
    co.curve_secret_key = text_or(o.curve_secret_key, "");
    bool keys = !co.curve_public_key.empty() || !co.curve_secret_key.empty();
    if (co.curve_server_key.empty() ? keys : co.curve_public_key.empty() || co.curve_secret_key.empty())
      return fail(NPC_ERR_ARGUMENT, "CURVE needs curve_server_key, curve_public_key and curve_secret_key together");
    if (!(o.budget_ms >= 0) || !(o.ping_interval_s > 0) || !(o.heartbeat_timeout_s > 0) || !(o.deadline_grace_ms >= 0))
      return fail(NPC_ERR_ARGUMENT, "budget_ms and deadline_grace_ms must be >= 0, the heartbeat times > 0");
    *out = new npc_client{npc::Client(text_or(o.endpoint, npc::kDefaultAddr), co), o.budget_ms, {}};
    return NPC_OK;
  });
}

void npc_close(npc_client* client) {
  guarded([&] {
    delete client;
    return NPC_OK;
  });
}

int32_t npc_connected(const npc_client* client) { return client && client->client.connected() ? 1 : 0; }

npc_status npc_server(const npc_client* client, npc_event** out) {
  return guarded([&] {
    if (!client || !out) return fail(NPC_ERR_ARGUMENT, "client or out is NULL");
    *out = client->client.server().type.empty() ? nullptr : new npc_event{client->client.server()};
    return NPC_OK;
  });
}

npc_status npc_say(npc_client* client, const char* npc, const char* session, const char* text, const char* id,
                   const npc_say_options* options, char* id_out, size_t id_out_size) {
  return guarded([&] {
    if (!client || !npc || !text) return fail(NPC_ERR_ARGUMENT, "client, npc and text must not be NULL");
    npc_say_options o;
    npc_say_options_init(&o);
    if (options && options->size != sizeof o)
      return fail(NPC_ERR_ARGUMENT, "npc_say_options.size is not sizeof(npc_say_options): header and library differ");
    if (options) o = *options;
    if (o.priority != 0 && o.priority != 1) return fail(NPC_ERR_ARGUMENT, "priority must be 0 (player) or 1 (ambient)");
    npc::SayOptions so;
    so.session = text_or(session, "default");
    so.id = id ? std::string(id) : client->client.new_id();
    if (o.max_tokens != 0) so.max_tokens = o.max_tokens;
    if (o.seed >= 0) so.seed = o.seed;
    if (o.temperature >= 0) so.temperature = o.temperature;
    if (o.deadline_ms != 0) so.deadline_ms = o.deadline_ms;
    so.priority = o.priority == 1 ? "ambient" : "player";
    so.stream = o.stream != 0;
    so.open = o.open != 0;
    if (npc_status s = copy_id(so.id, id_out, id_out_size)) return s;
    client->client.say(npc, text, so);
    return NPC_OK;
  });
}

npc_status npc_append(npc_client* client, const char* id, const char* text, int32_t final) {
  return guarded([&] {
    if (!client || !id || !text) return fail(NPC_ERR_ARGUMENT, "client, id and text must not be NULL");
    client->client.append(id, text, final != 0);
    return NPC_OK;
  });
}

npc_status npc_cancel(npc_client* client, const char* id) {
  return guarded([&] {
    if (!client || !id) return fail(NPC_ERR_ARGUMENT, "client and id must not be NULL");
    client->client.cancel(id);
    return NPC_OK;
  });
}

npc_status npc_hello(npc_client* client, char* id_out, size_t id_out_size) {
  return request(client, id_out, id_out_size, [&](const std::string& id) { client->client.hello(id); });
}

npc_status npc_ping(npc_client* client, char* id_out, size_t id_out_size) {
  return request(client, id_out, id_out_size, [&](const std::string& id) { client->client.ping(id); });
}

npc_status npc_npcs(npc_client* client, char* id_out, size_t id_out_size) {
  return request(client, id_out, id_out_size, [&](const std::string& id) { client->client.npcs(id); });
}

int32_t npc_poll(npc_client* client, double budget_ms) {
  int32_t ready = 0;
  npc_status s = guarded([&] {
    if (!client) return fail(NPC_ERR_ARGUMENT, "client is NULL");
    for (npc::Event& e : client->client.poll(budget_ms < 0 ? client->budget_ms : budget_ms))
      client->ready.push_back(std::move(e));
    ready = static_cast<int32_t>(std::min<size_t>(client->ready.size(), INT32_MAX));
    return NPC_OK;
  });
  return s == NPC_OK ? ready : s;
}

npc_event* npc_next_event(npc_client* client) {
  npc_event* out = nullptr;
  guarded([&] {
    if (!client || client->ready.empty()) return NPC_OK;
    out = new npc_event{std::move(client->ready.front())};
    client->ready.pop_front();
    return NPC_OK;
  });
  return out;
}

npc_status npc_wait(npc_client* client, int32_t timeout_ms) {
  return guarded([&] {
    if (!client) return fail(NPC_ERR_ARGUMENT, "client is NULL");
    if (client->ready.empty()) client->client.wait(timeout_ms);
    return NPC_OK;
  });
}

void npc_event_free(npc_event* event) { delete event; }

npc_event_type_t npc_event_type(const npc_event* event) {
  if (!event) return NPC_EVENT_OTHER;
  static const char* const kNames[] = {"token", "done", "error", "welcome", "pong", "npcs", "connection"};
  for (int32_t i = 0; i < 7; ++i)
    if (event->event.type == kNames[i]) return i + 1;
  return NPC_EVENT_OTHER;
}

const char* npc_event_type_name(const npc_event* event) { return event ? event->event.type.c_str() : ""; }
const char* npc_event_id(const npc_event* event) { return event ? event->event.id.c_str() : ""; }
const char* npc_event_text(const npc_event* event) { return event ? event->event.text.c_str() : ""; }
const char* npc_event_code(const npc_event* event) { return event ? event->event.code.c_str() : ""; }
const char* npc_event_message(const npc_event* event) { return event ? event->event.message.c_str() : ""; }
const char* npc_event_instance(const npc_event* event) { return event ? event->event.instance.c_str() : ""; }
int64_t npc_event_seq(const npc_event* event) { return event ? event->event.seq : -1; }
int64_t npc_event_tokens(const npc_event* event) { return event ? event->event.tokens : 0; }

uint32_t npc_event_flags(const npc_event* event) {
  if (!event) return 0;
  const npc::Event& e = event->event;
  return (e.fallback ? NPC_FLAG_FALLBACK : 0u) | (e.cancelled ? NPC_FLAG_CANCELLED : 0u) |
         (e.deflected ? NPC_FLAG_DEFLECTED : 0u) | (e.synthetic ? NPC_FLAG_SYNTHETIC : 0u) |
         (e.connected ? NPC_FLAG_CONNECTED : 0u);
}

void npc_event_stats(const npc_event* event, npc_stats* out) {
  if (!out) return;
  *out = npc_stats{-1.0, 0, 0, 0, 0, 0, 0};
  if (!event) return;
  const npc::Stats& s = event->event.stats;
  *out = npc_stats{s.ttft_ms.value_or(-1.0), s.total_ms, s.drafted, s.accepted, s.target_forwards,
                   s.cached_prefix_tokens, s.prompt_tokens};
}

int64_t npc_event_limit(const npc_event* event, const char* name) {
  if (!event || !name) return -1;
  auto it = event->event.limits.find(name);
  return it == event->event.limits.end() ? -1 : it->second;
}

size_t npc_event_list_size(const npc_event* event, int32_t list) {
  const std::vector<std::string>* items = list_of(event, list);
  return items ? items->size() : 0;
}

const char* npc_event_list_item(const npc_event* event, int32_t list, size_t index) {
  const std::vector<std::string>* items = list_of(event, list);
  return items && index < items->size() ? (*items)[index].c_str() : "";
}

}  // extern "C"
