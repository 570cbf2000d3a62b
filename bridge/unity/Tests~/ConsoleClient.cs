// A console game loop over the Runtime sources, for tests/test_unity.py (the C# twin of
// bridge/cpp/example.cpp): asks one NPC for a line and prints it as it streams.
//
//   mono client.exe [--connect ADDR] [--deadline-ms N] [--cancel-after N] [--frame-ms N] [--max-tokens N]
//                   [--seed N] [--session S] [--heartbeat-s N] [--pieces] [--server] NPC TEXT...
//
// Prints "npc: " and the streamed text, then "done: ..." and "text: <done.text>", or
// "error: CODE WIRE_CODE MESSAGE"; --server first prints the welcome. Exit status: 0 after done,
// 1 after an error, 2 for bad arguments.
using System;
using System.Collections.Generic;
using System.Globalization;
using System.Threading;
using NpcEngine.Bridge;

static class ConsoleClient
{
    const string Usage = "usage: client.exe [--connect ADDR] [--deadline-ms N] [--cancel-after N] [--frame-ms N] " +
                         "[--max-tokens N] [--seed N] [--session S] [--heartbeat-s N] [--pieces] [--server] NPC TEXT...";

    static int Main(string[] args)
    {
        var options = new NpcClientOptions();
        var say = new SayOptions { Session = "cs-console" };
        int cancelAfter = -1, frameMs = 16;
        bool server = false;
        string npc = null;
        var words = new List<string>();
        CultureInfo c = CultureInfo.InvariantCulture;
        for (int i = 0; i < args.Length; i++)
        {
            string arg = args[i];
            bool value = i + 1 < args.Length;
            if (arg == "--connect" && value) options.Endpoint = args[++i];
            else if (arg == "--deadline-ms" && value) say.DeadlineMs = double.Parse(args[++i], c);
            else if (arg == "--cancel-after" && value) cancelAfter = int.Parse(args[++i], c);
            else if (arg == "--frame-ms" && value) frameMs = int.Parse(args[++i], c);
            else if (arg == "--max-tokens" && value) say.MaxTokens = long.Parse(args[++i], c);
            else if (arg == "--seed" && value) say.Seed = long.Parse(args[++i], c);
            else if (arg == "--session" && value) say.Session = args[++i];
            else if (arg == "--heartbeat-s" && value)
            {
                options.HeartbeatTimeoutS = double.Parse(args[++i], c);
                options.PingIntervalS = options.HeartbeatTimeoutS / 3;
            }
            else if (arg == "--pieces") say.Open = true;
            else if (arg == "--server") server = true;
            else if (arg == "-h" || arg == "--help") { Console.WriteLine(Usage); return 0; }
            else if (npc == null && arg.StartsWith("-")) { Console.Error.WriteLine(Usage); return 2; }
            else if (npc == null) npc = arg;
            else words.Add(arg);
        }
        if (npc == null) { Console.Error.WriteLine(Usage); return 2; }

        using (var client = new NpcClient(options))
        {
            var events = new List<NpcEvent>();
            for (int frame = 0; (server || say.Open) && client.Server == null; frame++)  // an open say needs the caps
            {
                if (frame == 3000) { Console.WriteLine("error: no welcome from " + options.Endpoint); return 1; }
                client.Poll(events, 1.0);
                LogConnections(events);
                Thread.Sleep(1);
            }
            if (server)
            {
                WelcomeEvent w = client.Server;
                Console.WriteLine("server: npcs=" + string.Join(",", w.Npcs) + " caps=" + string.Join(",", w.Caps) +
                                  " max_text_chars=" + w.Limits["max_text_chars"]);
            }
            string id = client.Say(npc, say.Open ? (words.Count > 0 ? words[0] : "") : string.Join(" ", words), say);
            int typed = 1, tokens = 0;
            bool typing = say.Open;
            Console.Write("npc: ");
            for (;;)  // one iteration per game frame
            {
                if (typing)
                {
                    bool last = typed + 1 >= words.Count;
                    client.Append(id, typed < words.Count ? " " + words[typed] : "", last);
                    typed++;
                    typing = !last;
                }
                client.Poll(events, 1.0);
                LogConnections(events);
                foreach (NpcEvent e in events)
                {
                    if (e.Id != id) continue;
                    var token = e as TokenEvent;
                    var done = e as DoneEvent;
                    var error = e as ErrorEvent;
                    if (token != null)
                    {
                        if (token.Seq != tokens) { Console.WriteLine("\nerror: seq_gap"); return 1; }
                        Console.Write(token.Text);
                        if (++tokens == cancelAfter) client.Cancel(id);
                    }
                    else if (done != null)
                    {
                        Console.WriteLine(string.Format(c, "\ndone: tokens={0} fallback={1} cancelled={2} deflected={3} " +
                                                        "messages={4} ttft_ms={5} total_ms={6} prompt_tokens={7}",
                                                        done.Tokens, done.Fallback ? 1 : 0, done.Cancelled ? 1 : 0,
                                                        done.Deflected ? 1 : 0, tokens, done.Stats.TtftMs ?? -1,
                                                        done.Stats.TotalMs, done.Stats.PromptTokens));
                        Console.WriteLine("text: " + done.Text);
                        return 0;
                    }
                    else if (error != null)
                    {
                        Console.WriteLine("\nerror: " + error.Code + " " + error.CodeName + " " + error.Message +
                                          (error.Synthetic ? " (client-side)" : ""));
                        return 1;
                    }
                }
                Thread.Sleep(frameMs);  // render the frame
            }
        }
    }

    static void LogConnections(List<NpcEvent> events)
    {
        foreach (NpcEvent e in events)
        {
            var connection = e as ConnectionEvent;
            if (connection != null) Console.Error.WriteLine(connection.Connected ? "[connected]" : "[connection lost]");
        }
    }
}
