// Protocol 1.2 with npc_bridge.hpp: a conversation saved into a save file and restored, a memory, and a
// scene of two NPCs. It prints one line per step, for people and for tests/test_cpp_client.py.
//
//   ./save_and_scene [--connect ADDR] [--session S] NPC OTHER HOST
//
// Steps: NPC hears a line in session S-a and gets a memory; S-a is exported (the blob a game keeps in its
// save file) and imported into S-b; the same line in both sessions then has the same prompt; forgetting the
// memory in S-b shortens S-b's prompt; a damaged blob is refused. Then a scene of NPC and OTHER run by HOST,
// with a toast on the itinerary and a guest who promised to come: the player speaks to OTHER, who answers;
// the host welcomes the room; the itinerary moves on and the host announces the toast; NPC leaves; it closes.
// Exit status: 0 when every step got its reply, 1 otherwise, 2 for bad arguments.
#include "npc_bridge.hpp"

#include <algorithm>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr double kWaitMs = 60000;

// Polls until `id` has its one reply, or for a line its terminal event: then every event of the line,
// including any that arrives in the next 300 ms (a second terminal would be a bug to show).
std::vector<npc::Event> events_of(npc::Client& client, const std::string& id, bool line) {
  using Clock = std::chrono::steady_clock;
  std::vector<npc::Event> out;
  auto end = Clock::now() + std::chrono::duration<double, std::milli>(kWaitMs);
  bool ended = false;
  while (Clock::now() < end) {
    for (npc::Event& e : client.poll(1.0)) {
      if (e.id != id) continue;
      out.push_back(e);
      if (!line) return out;
      if (e.terminal() && !ended) {
        ended = true;
        end = Clock::now() + std::chrono::milliseconds(300);
      }
    }
    client.wait(5);
  }
  if (!ended) throw std::runtime_error("no reply to " + id);
  return out;
}

const npc::Event& terminal_of(const std::vector<npc::Event>& events) {
  return *std::find_if(events.begin(), events.end(), [](const npc::Event& e) { return e.terminal(); });
}

npc::Event reply(npc::Client& client, const std::string& id) {
  npc::Event e = events_of(client, id, false).back();
  if (e.type == "error") throw std::runtime_error(e.code + " " + e.message);
  return e;
}

// A greedy 4-token line of `npc` in `session`: its done.
npc::Event say(npc::Client& client, const std::string& npc, const std::string& session, const std::string& text) {
  npc::SayOptions o;
  o.session = session;
  o.max_tokens = 4;
  o.temperature = 0.0;
  npc::Event e = terminal_of(events_of(client, client.say(npc, text, o), true));
  if (e.type != "done") throw std::runtime_error(e.code + " " + e.message);
  return e;
}

// A scene line's events: "line SPEAKER TO", the number of tokens, one line per terminal event.
void print_line(const std::vector<npc::Event>& events, const char* what) {
  int tokens = 0, terminals = 0;
  for (const npc::Event& e : events) {
    if (e.type == "line")
      std::cout << what << ": speaker=" << e.speaker << " to=" << e.to << " cue=" << (e.cue.empty() ? "-" : e.cue)
                << " item=" << (e.item ? std::to_string(*e.item) : "-") << "\n";
    if (e.type == "token") ++tokens;
    if (e.terminal()) ++terminals;
  }
  const npc::Event& last = terminal_of(events);
  std::cout << what << "-end: type=" << last.type << " code=" << (last.code.empty() ? "-" : last.code)
            << " emotion=" << (last.emotion.empty() ? "-" : last.emotion)
            << " scene=" << last.scene << " speaker=" << last.speaker << " tokens=" << tokens
            << " terminals=" << terminals << "\n";
}

const char* kUsage = "usage: save_and_scene [--connect ADDR] [--session S] NPC OTHER HOST\n";

}  // namespace

int main(int argc, char** argv) {
  std::string addr = npc::kDefaultAddr, session = "cpp-save";
  std::vector<std::string> npcs;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--connect" && i + 1 < argc) addr = argv[++i];
    else if (arg == "--session" && i + 1 < argc) session = argv[++i];
    else if (arg.rfind("-", 0) == 0 || npcs.size() == 3) {
      std::cerr << kUsage;
      return 2;
    } else npcs.push_back(arg);
  }
  if (npcs.size() != 3) {
    std::cerr << kUsage;
    return 2;
  }
  const std::string &npc = npcs[0], &other = npcs[1], &host = npcs[2];
  const std::string a = session + "-a", b = session + "-b";
  try {
    npc::Client old(addr);  // a 1.1 client: no caps asked for, no 1.2 calls
    reply(old, old.hello());
    std::cout << "1.1 client: protocol=1." << old.server().minor;
    try {
      old.list_memories(npc, a);
    } catch (const std::invalid_argument&) {
      std::cout << " memory=refused";
    }
    std::cout << "\n";

    npc::ClientOptions options;
    options.caps = {"memory", "scene", "emotion"};
    npc::Client client(addr, options);
    std::cout << "1.2 client: protocol=1." << reply(client, client.hello()).minor << "\n";

    say(client, npc, a, "My name is Ada.");
    npc::Event added = reply(client, client.add_memory(npc, a, "The player  saved my daughter."));
    std::cout << "memory.added: " << added.memory_id << " " << added.text << "\n";
    std::cout << "memories: " << reply(client, client.list_memories(npc, a)).memories.size() << "\n";

    std::string blob = reply(client, client.export_session(a, npc)).blob;
    std::cout << "blob: " << blob.size() << " bytes\n";
    npc::Event imported = reply(client, client.import_session(blob, b));
    std::cout << "imported:";
    for (const std::string& id : imported.npcs) std::cout << " " << id;
    std::cout << "\n";
    npc::Event in_a = say(client, npc, a, "Do you remember me?"), in_b = say(client, npc, b, "Do you remember me?");
    std::cout << "restored: prompt_tokens=" << in_a.stats.prompt_tokens << "," << in_b.stats.prompt_tokens
              << " same_text=" << (in_a.text == in_b.text) << "\n";

    std::cout << "forgotten: " << reply(client, client.forget_memory(npc, b, added.memory_id)).forgotten << "\n";
    in_a = say(client, npc, a, "And now?");
    in_b = say(client, npc, b, "And now?");
    std::cout << "after forget: prompt_tokens=" << in_a.stats.prompt_tokens << "," << in_b.stats.prompt_tokens << "\n";

    std::string damaged = blob;
    damaged[damaged.size() / 2] ^= 0x20;
    npc::Event refused = events_of(client, client.import_session(damaged, b), false).back();
    std::cout << "damaged blob: " << refused.type << " " << refused.code << "\n";

    const std::string scene = session + "-scene";
    npc::SceneOptions hosted;
    hosted.host = host;
    hosted.itinerary = {{"The toast", "nine"}};
    hosted.guests = {npc::Guest{"Mayor Aldous", "coming", "the mayor", "", false}};
    npc::Event opened = reply(client, client.open_scene(scene, {npc, other, host}, "A quiet tavern evening.", hosted));
    std::cout << "scene.state: cast=" << opened.state->cast.size() << " present=" << opened.state->present.size()
              << " host=" << opened.state->host << " missing=" << opened.state->missing.at(0) << "\n";
    npc::LineOptions line;
    line.to = other;
    line.max_tokens = 6;
    print_line(events_of(client, client.scene_say(scene, "Evening! What news?", line), true), "say");
    npc::LineOptions ambient;
    ambient.max_tokens = 6;
    print_line(events_of(client, client.scene_next(scene, ambient), true), "next");
    npc::SceneEvent toast;
    toast.itinerary = std::string("next");
    std::cout << "moved to: " << reply(client, client.scene_event(scene, toast)).state->position << "\n";
    print_line(events_of(client, client.scene_next(scene, ambient), true), "item");
    npc::Event cast = reply(client, client.scene_cast(scene, {}, {npc}));
    std::cout << "cast:";
    for (const std::string& id : cast.state->cast) std::cout << " " << id;
    std::cout << "\n";
    npc::Event state = reply(client, client.scene_state(scene));
    std::cout << "transcript:";
    for (const npc::SceneLine& l : state.state->transcript) std::cout << " " << (l.speaker.empty() ? "-" : l.speaker);
    std::cout << "\n";
    std::cout << "closed: " << reply(client, client.close_scene(scene)).scene << "\n";
    npc::Event gone = events_of(client, client.scene_state(scene), false).back();
    std::cout << "after close: " << gone.type << " " << gone.code << std::endl;
  } catch (const std::exception& e) {
    std::cout << "failed: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
