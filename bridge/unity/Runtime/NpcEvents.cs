// What NpcClient.Poll returns: one object per message from the service or per event of the client
// itself (Synthetic). Every Say id gets exactly one terminal event: DoneEvent or ErrorEvent.
using System;
using System.Collections.Generic;

namespace NpcEngine.Bridge
{
    public abstract class NpcEvent
    {
        public string Id { get; internal set; }          // the request this answers; "" when none
        public bool Synthetic { get; internal set; }     // made by the client, not sent by the service
        public virtual bool Terminal { get { return false; } }
    }

    // The next piece of a line: append Text to what is on screen.
    public sealed class TokenEvent : NpcEvent
    {
        public long Seq { get; internal set; }           // 0, 1, 2, ... per request
        public string Text { get; internal set; }
    }

    public struct NpcStats
    {
        public double? TtftMs;                           // null when no token was generated
        public double TotalMs;
        public long Drafted, Accepted, TargetForwards, CachedPrefixTokens, PromptTokens;
    }

    // The line is complete. Show Text: it replaces what streamed when Fallback or Deflected is set.
    public sealed class DoneEvent : NpcEvent
    {
        public string Text { get; internal set; }
        public long Tokens { get; internal set; }
        public bool Fallback { get; internal set; }      // the deadline was missed: a fallback line
        public bool Cancelled { get; internal set; }     // ended by Cancel: Text is what streamed
        public bool Deflected { get; internal set; }     // a banned topic: the persona's deflection line
        public NpcStats Stats { get; internal set; }
        public override bool Terminal { get { return true; } }
    }

    public enum NpcErrorCode
    {
        Other, BadRequest, UnknownType, Unsupported, UnknownNpc, TooLarge, Overloaded, VersionMismatch,
        DuplicateId, ShuttingDown, Internal, OpenTimeout,
        Disconnected, // client-side: the service was lost or restarted
        Timeout,      // client-side: no answer a while after the say's deadline
    }

    public sealed class ErrorEvent : NpcEvent
    {
        public NpcErrorCode Code { get; internal set; }
        public string CodeName { get; internal set; }    // the wire code, e.g. "unknown_npc"
        public string Message { get; internal set; }
        public override bool Terminal { get { return true; } }

        internal static NpcErrorCode Parse(string code)
        {
            string name = code.Replace("_", "");
            foreach (NpcErrorCode value in Enum.GetValues(typeof(NpcErrorCode)))
                if (value != NpcErrorCode.Other && string.Equals(value.ToString(), name, StringComparison.OrdinalIgnoreCase))
                    return value;
            return NpcErrorCode.Other;
        }
    }

    // The service answered for the first time since the connection was (re)opened, or was lost.
    public sealed class ConnectionEvent : NpcEvent
    {
        public bool Connected { get; internal set; }
    }

    // The answer to Hello, and NpcClient.Server: what the service serves and its limits.
    public sealed class WelcomeEvent : NpcEvent
    {
        public string Instance { get; internal set; }    // changes when the service restarts
        public string[] Npcs { get; internal set; }
        public string[] Caps { get; internal set; }
        public Dictionary<string, long> Limits { get; internal set; }  // max_text_chars, max_tokens, ...
    }

    public sealed class PongEvent : NpcEvent
    {
        public string Instance { get; internal set; }
    }

    public sealed class NpcsEvent : NpcEvent
    {
        public string[] Npcs { get; internal set; }
    }

    public class NpcException : Exception
    {
        public int Status { get; private set; }

        public NpcException(int status, string message) : base(message) { Status = status; }
    }
}
