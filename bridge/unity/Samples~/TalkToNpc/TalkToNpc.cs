// Talk to one NPC: put this on any GameObject, start `npc-engine serve`, press Play, type a line and
// press Enter. The reply streams into the label; the client is polled once per frame within a budget.
using System.Collections.Generic;
using NpcEngine.Bridge;
using UnityEngine;

public class TalkToNpc : MonoBehaviour
{
    [SerializeField] string endpoint = "tcp://127.0.0.1:5555";
    [SerializeField] string npc = "blacksmith";
    [SerializeField] string session = "player1";
    [SerializeField] double deadlineMs = 3000;   // the NPC always answers by then, with a fallback line if need be
    [SerializeField] double budgetMs = 1.0;      // what polling may take out of a frame

    NpcClient client;
    readonly List<NpcEvent> events = new List<NpcEvent>();
    string input = "", line = "", status = "connecting...";
    string pending;                              // the id of the line being answered

    void Start()
    {
        client = new NpcClient(new NpcClientOptions { Endpoint = endpoint, ClientName = "unity-sample" });
    }

    void Update()
    {
        client.Poll(events, budgetMs);
        foreach (NpcEvent e in events)
        {
            var connection = e as ConnectionEvent;
            if (connection != null) status = connection.Connected ? "" : "the NPC service is not running";
            if (e.Id != pending) continue;
            var token = e as TokenEvent;
            var done = e as DoneEvent;
            var error = e as ErrorEvent;
            if (token != null) line += token.Text;
            if (done != null) line = done.Text;   // differs from the stream for fallback and deflected lines
            if (error != null)
            {
                Debug.LogWarning("npc-engine: " + error.CodeName + ": " + error.Message);
                line = error.Code == NpcErrorCode.UnknownNpc ? "(no NPC called " + npc + ")" : "...";
            }
            if (e.Terminal) pending = null;
        }
    }

    void OnGUI()
    {
        GUILayout.Label(npc + ": " + line);
        if (status != "") GUILayout.Label(status);
        Event key = Event.current;
        if (key.type == EventType.KeyDown && key.keyCode == KeyCode.Return && input.Trim() != "") Send();
        input = GUILayout.TextField(input, GUILayout.Width(400));
    }

    void Send()
    {
        if (pending != null) client.Cancel(pending);  // the player spoke again: drop the old answer
        pending = client.Say(npc, input, new SayOptions { Session = session, DeadlineMs = deadlineMs });
        line = "";
        input = "";
    }

    void OnDestroy()
    {
        if (client != null) client.Dispose();
    }
}
