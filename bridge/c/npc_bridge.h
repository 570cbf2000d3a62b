/* npc_bridge.h: C ABI of the npc-engine client (protocol 1.1, see bridge/PROTOCOL.md), a shared
 * library over the header-only C++ client in bridge/cpp/. For engines and languages that load a
 * native library (Unity, Godot, Unreal plugins, ctypes).
 *
 *   npc_options o; npc_options_init(&o);            // o.endpoint = "tcp://127.0.0.1:5555"
 *   npc_client* c; npc_connect(&o, &c);
 *   char id[NPC_ID_SIZE];
 *   npc_say(c, "blacksmith", "player1", "Can you mend my sword?", NULL, NULL, id, sizeof id);
 *   // once per frame, never blocking longer than the budget:
 *   int n = npc_poll(c, 1.0);
 *   for (int i = 0; i < n; ++i) {
 *     npc_event* e = npc_next_event(c);
 *     if (npc_event_type(e) == NPC_EVENT_TOKEN) show(npc_event_text(e));
 *     npc_event_free(e);
 *   }
 *   npc_close(c);
 *
 * Rules: strings in and out are NUL-terminated UTF-8. A string returned by an npc_event_* function
 * belongs to the event and lives until npc_event_free. Every other result goes into a buffer the
 * caller owns. Functions never throw or abort: they return an npc_status (0 = NPC_OK) and
 * npc_last_error() says why. A client is used from one thread at a time; different clients are
 * independent. Every say gets exactly one terminal event (NPC_EVENT_DONE or NPC_EVENT_ERROR). */
#ifndef NPC_BRIDGE_H
#define NPC_BRIDGE_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  if defined(NPC_BRIDGE_BUILD)
#    define NPC_API __declspec(dllexport)
#  else
#    define NPC_API __declspec(dllimport)
#  endif
#else
#  define NPC_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define NPC_ABI_VERSION 1
/* Enough for every id the client makes; an id the caller chose may need up to 513 bytes. */
#define NPC_ID_SIZE 64

typedef int32_t npc_status;
#define NPC_OK 0
#define NPC_ERR_ARGUMENT (-1)  /* a NULL handle, invalid UTF-8, a value the service would refuse */
#define NPC_ERR_BUFFER (-2)    /* the caller's buffer is too small: nothing was sent */
#define NPC_ERR_TRANSPORT (-3) /* ZeroMQ refused: a bad endpoint or CURVE key */
#define NPC_ERR_INTERNAL (-4)  /* out of memory, or a fault inside the library */

typedef int32_t npc_event_type_t;
#define NPC_EVENT_OTHER 0 /* a message type this library does not know (see npc_event_type_name) */
#define NPC_EVENT_TOKEN 1
#define NPC_EVENT_DONE 2  /* terminal */
#define NPC_EVENT_ERROR 3 /* terminal for a say; code in npc_event_code */
#define NPC_EVENT_WELCOME 4
#define NPC_EVENT_PONG 5
#define NPC_EVENT_NPCS 6
#define NPC_EVENT_CONNECTION 7 /* the service was heard from (NPC_FLAG_CONNECTED) or lost */

/* npc_event_flags bits */
#define NPC_FLAG_FALLBACK 1u  /* done: the deadline was missed; text is a fallback line */
#define NPC_FLAG_CANCELLED 2u /* done: ended by npc_cancel */
#define NPC_FLAG_DEFLECTED 4u /* done: a banned topic; text is the deflection line */
#define NPC_FLAG_SYNTHETIC 8u /* made by the client (connection, error disconnected/timeout) */
#define NPC_FLAG_CONNECTED 16u /* connection: true when heard from, clear when lost */

/* npc_event_list_size / npc_event_list_item */
#define NPC_LIST_NPCS 0 /* welcome: persona ids served; npcs: the ids of the personas */
#define NPC_LIST_CAPS 1 /* welcome: the service's capabilities */

typedef struct npc_client npc_client;
typedef struct npc_event npc_event;

typedef struct npc_options {
  uint32_t size;                /* sizeof(npc_options): set by npc_options_init */
  const char* endpoint;         /* NULL: "tcp://127.0.0.1:5555" */
  const char* client_name;      /* sent in hello, for the service's logs; NULL: "bridge-c" */
  const char* curve_server_key; /* CURVE: the service's public key, 40 Z85 characters; NULL: none */
  const char* curve_public_key; /* CURVE: this client's key pair (both needed with a server key) */
  const char* curve_secret_key;
  double budget_ms;           /* what npc_poll reads at most when given a negative budget: 1.0 */
  double ping_interval_s;     /* ping after this much silence: 1.0 */
  double heartbeat_timeout_s; /* the service is lost when a ping stays unanswered this long: 3.0 */
  double deadline_grace_ms;   /* a say with a deadline gets error "timeout" this long after it: 1000 */
} npc_options;

typedef struct npc_say_options {
  uint32_t size;       /* sizeof(npc_say_options): set by npc_say_options_init */
  int32_t priority;    /* 0: player (default), 1: ambient */
  int64_t max_tokens;  /* 0: the persona's */
  int64_t seed;        /* negative: random */
  double temperature;  /* negative: the persona's; 0: greedy */
  double deadline_ms;  /* 0: none; else the line is answered within this many ms (a fallback if late) */
  int32_t stream;      /* 1 (default): token events; 0: only the terminal one */
  int32_t open;        /* 1: the player is still typing; send the rest with npc_append */
} npc_say_options;

typedef struct npc_stats {
  double ttft_ms; /* ms from receipt to the first generated token; negative when none was */
  double total_ms;
  int64_t drafted, accepted, target_forwards, cached_prefix_tokens, prompt_tokens;
} npc_stats;

NPC_API int32_t npc_abi_version(void);
/* Why the last call on this thread failed; "" after a success. Valid until the next call. */
NPC_API const char* npc_last_error(void);

NPC_API void npc_options_init(npc_options* options);
NPC_API void npc_say_options_init(npc_say_options* options);

/* Opens the client (it connects in the background and says hello; nothing blocks). options may be
 * NULL for the defaults. On success *out is a client to npc_close. */
NPC_API npc_status npc_connect(const npc_options* options, npc_client** out);
NPC_API void npc_close(npc_client* client); /* NULL is fine; drops anything unsent */

/* 1 once the service has answered, until it is considered lost; 0 otherwise. */
NPC_API int32_t npc_connected(const npc_client* client);
/* A copy of the latest welcome (npcs, caps, limits, instance), to npc_event_free; *out is NULL
 * before the first welcome. */
NPC_API npc_status npc_server(const npc_client* client, npc_event** out);

/* Ask npc for a line. session: the conversation key (NULL: "default"); id: the request id (NULL:
 * the client makes one); options: NULL for the defaults. The id goes to id_out (may be NULL) of
 * id_out_size bytes. */
NPC_API npc_status npc_say(npc_client* client, const char* npc, const char* session, const char* text,
                           const char* id, const npc_say_options* options, char* id_out, size_t id_out_size);
/* The next piece of the open say id, appended verbatim; final = 1 completes the line. A say that
 * has ended is left alone; one that is running but not open is NPC_ERR_ARGUMENT. */
NPC_API npc_status npc_append(npc_client* client, const char* id, const char* text, int32_t final);
/* Stop a running say: it ends with done and NPC_FLAG_CANCELLED unless it was already ending. */
NPC_API npc_status npc_cancel(npc_client* client, const char* id);
/* hello (welcome event), ping (pong event), npcs (npcs event); the request id goes to id_out. */
NPC_API npc_status npc_hello(npc_client* client, char* id_out, size_t id_out_size);
NPC_API npc_status npc_ping(npc_client* client, char* id_out, size_t id_out_size);
NPC_API npc_status npc_npcs(npc_client* client, char* id_out, size_t id_out_size);

/* Reads what has arrived for at most budget_ms (negative: options.budget_ms), never waiting for
 * more; returns how many events are ready for npc_next_event (or a negative npc_status). */
NPC_API int32_t npc_poll(npc_client* client, double budget_ms);
/* The next ready event, to npc_event_free; NULL when none is left. */
NPC_API npc_event* npc_next_event(npc_client* client);
/* Blocks until a message arrives or timeout_ms passes: for tools and tests; games only poll. */
NPC_API npc_status npc_wait(npc_client* client, int32_t timeout_ms);

NPC_API void npc_event_free(npc_event* event); /* NULL is fine */
NPC_API npc_event_type_t npc_event_type(const npc_event* event);
/* Accessors return "" / 0 / -1 where the event has no such field (and for a NULL event). */
NPC_API const char* npc_event_type_name(const npc_event* event); /* "token", "done", ... */
NPC_API const char* npc_event_id(const npc_event* event);        /* "" when the service sent nil */
NPC_API const char* npc_event_text(const npc_event* event);      /* token: the piece; done: the line */
NPC_API const char* npc_event_code(const npc_event* event);      /* error: "unknown_npc", "disconnected", ... */
NPC_API const char* npc_event_message(const npc_event* event);   /* error: a sentence for logs */
NPC_API const char* npc_event_instance(const npc_event* event);  /* welcome, pong */
NPC_API int64_t npc_event_seq(const npc_event* event);           /* token: 0, 1, ...; else -1 */
NPC_API int64_t npc_event_tokens(const npc_event* event);        /* done: model tokens generated */
NPC_API uint32_t npc_event_flags(const npc_event* event);        /* NPC_FLAG_* */
NPC_API void npc_event_stats(const npc_event* event, npc_stats* out); /* done */
NPC_API int64_t npc_event_limit(const npc_event* event, const char* name); /* welcome.limits[name]; -1 */
NPC_API size_t npc_event_list_size(const npc_event* event, int32_t list);
NPC_API const char* npc_event_list_item(const npc_event* event, int32_t list, size_t index);

#ifdef __cplusplus
}
#endif
#endif /* NPC_BRIDGE_H */
