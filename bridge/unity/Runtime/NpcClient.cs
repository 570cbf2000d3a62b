// A client of the npc-engine service for a game loop: Say and Cancel from game code, and Poll once
// per frame with a time budget (it never waits for the network). Use one NpcClient from one thread
// (Unity's main thread); Dispose it when done.
//
//   var client = new NpcClient();                       // tcp://127.0.0.1:5555
//   string id = client.Say("blacksmith", "Can you mend my sword?", new SayOptions { DeadlineMs = 3000 });
//   // in Update():
//   client.Poll(events);                               // at most 1 ms
//   foreach (NpcEvent e in events) { ... }             // TokenEvent ... then DoneEvent or ErrorEvent
using System;
using System.Collections.Generic;
using System.Runtime.InteropServices;

namespace NpcEngine.Bridge
{
    public sealed class NpcClientOptions
    {
        public string Endpoint = "tcp://127.0.0.1:5555";
        public string ClientName = "bridge-unity";
        // CURVE, when the service is not on this machine: the service's public key and this game's
        // key pair, 40 Z85 characters each (PROTOCOL.md section 10). All null: no CURVE.
        public string CurveServerKey, CurvePublicKey, CurveSecretKey;
        public double BudgetMs = 1.0;           // Poll's default budget
        public double PingIntervalS = 1.0;      // ping after this much silence
        public double HeartbeatTimeoutS = 3.0;  // lost when a ping stays unanswered this long
        public double DeadlineGraceMs = 1000;   // ErrorEvent Timeout this long after a missed deadline
    }

    public enum Priority { Player, Ambient }

    public sealed class SayOptions
    {
        public string Session = "default";  // the conversation: use one per player or save
        public string Id;                   // null: the client makes one
        public long? MaxTokens;             // null: the persona's
        public long? Seed;
        public double? Temperature;         // null: the persona's; 0: greedy
        public double? DeadlineMs;          // answered within this many ms, by a fallback line if need be
        public Priority Priority = Priority.Player;
        public bool Stream = true;          // false: no TokenEvent, only the terminal event
        public bool Open;                   // the player is still typing: send the rest with Append
    }

    public sealed class NpcClient : IDisposable
    {
        static readonly string[] LimitNames =
            { "max_message_bytes", "max_text_chars", "max_tokens", "max_inflight", "max_deadline_ms", "max_open_ms" };

        IntPtr handle;
        readonly byte[] idBuffer = new byte[Native.IdSize];

        public NpcClient(NpcClientOptions options = null)
        {
            if (Native.npc_abi_version() != Native.AbiVersion)
                throw new NpcException(Native.ErrInternal, "the npc_bridge library does not match these bindings");
            options = options ?? new NpcClientOptions();
            var o = new Native.Options();
            Native.npc_options_init(ref o);
            var strings = new List<IntPtr>();
            try
            {
                o.Endpoint = Alloc(options.Endpoint, strings);
                o.ClientName = Alloc(options.ClientName, strings);
                o.CurveServerKey = Alloc(options.CurveServerKey, strings);
                o.CurvePublicKey = Alloc(options.CurvePublicKey, strings);
                o.CurveSecretKey = Alloc(options.CurveSecretKey, strings);
                o.BudgetMs = options.BudgetMs;
                o.PingIntervalS = options.PingIntervalS;
                o.HeartbeatTimeoutS = options.HeartbeatTimeoutS;
                o.DeadlineGraceMs = options.DeadlineGraceMs;
                Native.Check(Native.npc_connect(ref o, out handle));
            }
            finally
            {
                foreach (IntPtr p in strings) Marshal.FreeHGlobal(p);
            }
        }

        ~NpcClient() { Close(); }

        public void Dispose()
        {
            Close();
            GC.SuppressFinalize(this);
        }

        // True once the service has answered, until it is considered lost.
        public bool Connected { get { return Native.npc_connected(Live) == 1; } }

        // The latest welcome (NPC ids, caps, limits); null until the service has answered.
        public WelcomeEvent Server
        {
            get
            {
                IntPtr ev;
                Native.Check(Native.npc_server(Live, out ev));
                if (ev == IntPtr.Zero) return null;
                try { return (WelcomeEvent)Convert(ev); }
                finally { Native.npc_event_free(ev); }
            }
        }

        // Ask npc for a line; returns the request id that its events carry.
        public string Say(string npc, string text, SayOptions options = null)
        {
            options = options ?? new SayOptions();
            var o = new Native.SayOptions();
            Native.npc_say_options_init(ref o);
            if (options.MaxTokens.HasValue) o.MaxTokens = options.MaxTokens.Value;
            if (options.Seed.HasValue) o.Seed = options.Seed.Value;
            if (options.Temperature.HasValue) o.Temperature = options.Temperature.Value;
            if (options.DeadlineMs.HasValue) o.DeadlineMs = options.DeadlineMs.Value;
            o.Priority = options.Priority == Priority.Ambient ? 1 : 0;
            o.Stream = options.Stream ? 1 : 0;
            o.Open = options.Open ? 1 : 0;
            byte[] id = options.Id == null ? idBuffer : new byte[Native.Utf8(options.Id).Length];
            Native.Check(Native.npc_say(Live, Native.Utf8(npc), Native.Utf8(options.Session), Native.Utf8(text),
                                        Native.Utf8(options.Id), ref o, id, (UIntPtr)id.Length));
            return Native.Id(id);
        }

        // The next piece of an open say, appended verbatim (include the spaces); final completes the line.
        public void Append(string id, string text, bool final = false)
        {
            Native.Check(Native.npc_append(Live, Native.Utf8(id), Native.Utf8(text), final ? 1 : 0));
        }

        // Stop a say: it ends with a DoneEvent with Cancelled set, unless it was already ending.
        public void Cancel(string id) { Native.Check(Native.npc_cancel(Live, Native.Utf8(id))); }

        public string Hello() { return Request(Native.npc_hello); }        // answered by a WelcomeEvent
        public string Ping() { return Request(Native.npc_ping); }          // answered by a PongEvent
        public string RequestNpcs() { return Request(Native.npc_npcs); }   // answered by an NpcsEvent

        // Replaces the contents of events with what arrived, reading for at most budgetMs (negative:
        // NpcClientOptions.BudgetMs); returns the count.
        public int Poll(List<NpcEvent> events, double budgetMs = -1)
        {
            events.Clear();
            int ready = Native.npc_poll(Live, budgetMs);
            if (ready < 0) Native.Check(ready);
            for (int i = 0; i < ready; i++)
            {
                IntPtr ev = Native.npc_next_event(handle);
                try
                {
                    NpcEvent e = Convert(ev);
                    if (e != null) events.Add(e);  // a message type this version does not know
                }
                finally { Native.npc_event_free(ev); }
            }
            return events.Count;
        }

        // Blocks until a message arrives or timeoutMs passes: for tools and tests, never in a frame.
        public void Wait(int timeoutMs) { Native.Check(Native.npc_wait(Live, timeoutMs)); }

        IntPtr Live
        {
            get
            {
                if (handle == IntPtr.Zero) throw new ObjectDisposedException("NpcClient");
                return handle;
            }
        }

        void Close()
        {
            if (handle == IntPtr.Zero) return;  // never opened (e.g. the library was missing) or closed
            Native.npc_close(handle);
            handle = IntPtr.Zero;
        }

        string Request(Func<IntPtr, byte[], UIntPtr, int> call)
        {
            Native.Check(call(Live, idBuffer, (UIntPtr)idBuffer.Length));
            return Native.Id(idBuffer);
        }

        static IntPtr Alloc(string s, List<IntPtr> owned)
        {
            byte[] bytes = Native.Utf8(s);
            if (bytes == null) return IntPtr.Zero;
            IntPtr p = Marshal.AllocHGlobal(bytes.Length);
            Marshal.Copy(bytes, 0, p, bytes.Length);
            owned.Add(p);
            return p;
        }

        static string[] List(IntPtr ev, int list)
        {
            var items = new string[(int)Native.npc_event_list_size(ev, list)];
            for (int i = 0; i < items.Length; i++) items[i] = Native.Str(Native.npc_event_list_item(ev, list, (UIntPtr)i));
            return items;
        }

        static NpcEvent Convert(IntPtr ev)
        {
            string id = Native.Str(Native.npc_event_id(ev));
            uint flags = Native.npc_event_flags(ev);
            bool synthetic = (flags & Native.FlagSynthetic) != 0;
            switch (Native.npc_event_type(ev))
            {
                case Native.EventToken:
                    return new TokenEvent { Id = id, Synthetic = synthetic, Seq = Native.npc_event_seq(ev),
                                            Text = Native.Str(Native.npc_event_text(ev)) };
                case Native.EventDone:
                    Native.Stats s;
                    Native.npc_event_stats(ev, out s);
                    return new DoneEvent
                    {
                        Id = id, Synthetic = synthetic, Text = Native.Str(Native.npc_event_text(ev)),
                        Tokens = Native.npc_event_tokens(ev), Fallback = (flags & Native.FlagFallback) != 0,
                        Cancelled = (flags & Native.FlagCancelled) != 0, Deflected = (flags & Native.FlagDeflected) != 0,
                        Stats = new NpcStats
                        {
                            TtftMs = s.TtftMs < 0 ? (double?)null : s.TtftMs, TotalMs = s.TotalMs, Drafted = s.Drafted,
                            Accepted = s.Accepted, TargetForwards = s.TargetForwards,
                            CachedPrefixTokens = s.CachedPrefixTokens, PromptTokens = s.PromptTokens,
                        },
                    };
                case Native.EventError:
                    string code = Native.Str(Native.npc_event_code(ev));
                    return new ErrorEvent { Id = id, Synthetic = synthetic, Code = ErrorEvent.Parse(code), CodeName = code,
                                            Message = Native.Str(Native.npc_event_message(ev)) };
                case Native.EventConnection:
                    return new ConnectionEvent { Id = id, Synthetic = synthetic, Connected = (flags & Native.FlagConnected) != 0 };
                case Native.EventWelcome:
                    var limits = new Dictionary<string, long>();
                    foreach (string name in LimitNames)
                    {
                        long value = Native.npc_event_limit(ev, Native.Utf8(name));
                        if (value >= 0) limits[name] = value;
                    }
                    return new WelcomeEvent { Id = id, Synthetic = synthetic, Instance = Native.Str(Native.npc_event_instance(ev)),
                                              Npcs = List(ev, Native.ListNpcs), Caps = List(ev, Native.ListCaps), Limits = limits };
                case Native.EventPong:
                    return new PongEvent { Id = id, Synthetic = synthetic, Instance = Native.Str(Native.npc_event_instance(ev)) };
                case Native.EventNpcs:
                    return new NpcsEvent { Id = id, Synthetic = synthetic, Npcs = List(ev, Native.ListNpcs) };
                default:
                    return null;
            }
        }
    }
}
