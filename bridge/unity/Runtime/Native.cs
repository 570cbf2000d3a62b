// P/Invoke declarations of the C ABI (bridge/c/npc_bridge.h). Strings go in as NUL-terminated UTF-8
// byte arrays and come out as pointers the event owns until npc_event_free.
using System;
using System.Runtime.InteropServices;
using System.Text;

namespace NpcEngine.Bridge
{
    internal static class Native
    {
        // npc_bridge.dll on Windows, libnpc_bridge.so on Linux and Android, libnpc_bridge.dylib on macOS.
        const string Lib = "npc_bridge";
        const CallingConvention Cdecl = CallingConvention.Cdecl;

        public const int Ok = 0, ErrArgument = -1, ErrBuffer = -2, ErrTransport = -3, ErrInternal = -4;
        public const int AbiVersion = 1, IdSize = 64;
        public const int EventToken = 1, EventDone = 2, EventError = 3, EventWelcome = 4, EventPong = 5,
            EventNpcs = 6, EventConnection = 7;
        public const uint FlagFallback = 1, FlagCancelled = 2, FlagDeflected = 4, FlagSynthetic = 8, FlagConnected = 16;
        public const int ListNpcs = 0, ListCaps = 1;

        [StructLayout(LayoutKind.Sequential)]
        public struct Options
        {
            public uint Size;
            public IntPtr Endpoint, ClientName, CurveServerKey, CurvePublicKey, CurveSecretKey;
            public double BudgetMs, PingIntervalS, HeartbeatTimeoutS, DeadlineGraceMs;
        }

        [StructLayout(LayoutKind.Sequential)]
        public struct SayOptions
        {
            public uint Size;
            public int Priority;
            public long MaxTokens, Seed;
            public double Temperature, DeadlineMs;
            public int Stream, Open;
        }

        [StructLayout(LayoutKind.Sequential)]
        public struct Stats
        {
            public double TtftMs, TotalMs;
            public long Drafted, Accepted, TargetForwards, CachedPrefixTokens, PromptTokens;
        }

        [DllImport(Lib, CallingConvention = Cdecl)] public static extern int npc_abi_version();
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern IntPtr npc_last_error();
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern void npc_options_init(ref Options options);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern void npc_say_options_init(ref SayOptions options);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern int npc_connect(ref Options options, out IntPtr client);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern void npc_close(IntPtr client);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern int npc_connected(IntPtr client);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern int npc_server(IntPtr client, out IntPtr ev);
        [DllImport(Lib, CallingConvention = Cdecl)]
        public static extern int npc_say(IntPtr client, byte[] npc, byte[] session, byte[] text, byte[] id,
                                         ref SayOptions options, [Out] byte[] idOut, UIntPtr idOutSize);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern int npc_append(IntPtr client, byte[] id, byte[] text, int final);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern int npc_cancel(IntPtr client, byte[] id);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern int npc_hello(IntPtr client, [Out] byte[] idOut, UIntPtr size);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern int npc_ping(IntPtr client, [Out] byte[] idOut, UIntPtr size);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern int npc_npcs(IntPtr client, [Out] byte[] idOut, UIntPtr size);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern int npc_poll(IntPtr client, double budgetMs);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern IntPtr npc_next_event(IntPtr client);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern int npc_wait(IntPtr client, int timeoutMs);

        [DllImport(Lib, CallingConvention = Cdecl)] public static extern void npc_event_free(IntPtr ev);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern int npc_event_type(IntPtr ev);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern IntPtr npc_event_id(IntPtr ev);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern IntPtr npc_event_text(IntPtr ev);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern IntPtr npc_event_code(IntPtr ev);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern IntPtr npc_event_message(IntPtr ev);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern IntPtr npc_event_instance(IntPtr ev);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern long npc_event_seq(IntPtr ev);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern long npc_event_tokens(IntPtr ev);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern uint npc_event_flags(IntPtr ev);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern void npc_event_stats(IntPtr ev, out Stats stats);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern long npc_event_limit(IntPtr ev, byte[] name);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern UIntPtr npc_event_list_size(IntPtr ev, int list);
        [DllImport(Lib, CallingConvention = Cdecl)] public static extern IntPtr npc_event_list_item(IntPtr ev, int list, UIntPtr index);

        public static byte[] Utf8(string s)
        {
            if (s == null) return null;
            byte[] bytes = new byte[Encoding.UTF8.GetByteCount(s) + 1];
            Encoding.UTF8.GetBytes(s, 0, s.Length, bytes, 0);
            return bytes;
        }

        public static string Str(IntPtr p)
        {
            if (p == IntPtr.Zero) return "";
            int n = 0;
            while (Marshal.ReadByte(p, n) != 0) n++;
            byte[] bytes = new byte[n];
            Marshal.Copy(p, bytes, 0, n);
            return Encoding.UTF8.GetString(bytes);
        }

        // The NUL-terminated id the library wrote into buffer.
        public static string Id(byte[] buffer)
        {
            int n = Array.IndexOf(buffer, (byte)0);
            return Encoding.UTF8.GetString(buffer, 0, n < 0 ? buffer.Length : n);
        }

        // Throws for a failed call: ArgumentException for bad arguments, NpcException otherwise.
        public static void Check(int status)
        {
            if (status == Ok) return;
            string why = Str(npc_last_error());
            if (status == ErrArgument) throw new ArgumentException(why);
            throw new NpcException(status, why);
        }
    }
}
