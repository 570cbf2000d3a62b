// A game loop that asks one NPC for a line and shows it as it streams, using npc_bridge.hpp.
//
//   ./example [--connect ADDR] [--deadline-ms N] [--cancel-after N] [--frame-ms N] [--max-tokens N]
//             [--seed N] [--session S] [--pieces] NPC TEXT...
//
// --pieces sends the line as the player would type it: an open say with the first word, then one
// say.append per frame with the next word, the last one final.
// Prints "npc: " and the streamed text (control characters escaped), then one line per terminal
// event: "done: ..." and "text: <done.text>", or "error: CODE MESSAGE". Exit status: 0 after
// done (and for --help), 1 after an error, 2 for bad arguments.
#include "npc_bridge.hpp"

#include <cstdio>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

static std::string printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

static const char* kUsage =
    "usage: example [--connect ADDR] [--deadline-ms N] [--cancel-after N] [--frame-ms N] [--max-tokens N]\n"
    "               [--seed N] [--session S] [--pieces] NPC TEXT...\n"
    "Asks NPC for a line (service tcp://127.0.0.1:5555 unless --connect) and prints it as it streams.\n";

int main(int argc, char** argv) {
  std::string addr = npc::kDefaultAddr, npc_id;
  std::vector<std::string> words;
  npc::SayOptions options;
  options.session = "cpp-example";
  int cancel_after = -1;
  double frame_ms = 16.0;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    bool has_value = i + 1 < argc;
    if (arg == "--connect" && has_value) addr = argv[++i];
    else if (arg == "--deadline-ms" && has_value) options.deadline_ms = std::stod(argv[++i]);
    else if (arg == "--cancel-after" && has_value) cancel_after = std::stoi(argv[++i]);
    else if (arg == "--frame-ms" && has_value) frame_ms = std::stod(argv[++i]);
    else if (arg == "--max-tokens" && has_value) options.max_tokens = std::stoll(argv[++i]);
    else if (arg == "--seed" && has_value) options.seed = std::stoll(argv[++i]);
    else if (arg == "--session" && has_value) options.session = argv[++i];
    else if (arg == "--pieces") options.open = true;
    else if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (npc_id.empty() && arg.rfind("-", 0) == 0) {
      std::cerr << "unknown option " << arg << "\n" << kUsage;
      return 2;
    } else if (npc_id.empty()) npc_id = arg;
    else words.push_back(arg);
  }
  if (npc_id.empty()) {
    std::cerr << kUsage;
    return 2;
  }
  std::string text;
  for (const std::string& w : words) text += (text.empty() ? "" : " ") + w;

  npc::Client client(addr);
  for (int frame = 0; options.open && !client.connected(); ++frame) {  // an open say needs the welcome's caps
    if (frame == 3000) {
      std::cout << "error: no welcome from " << addr << std::endl;
      return 1;
    }
    client.poll(1.0);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::string first = !options.open ? text : words.empty() ? "" : words[0];
  std::string id = client.say(npc_id, first, options);
  size_t typed = 1;  // words sent so far (with --pieces)
  bool typing = options.open;
  std::cout << "npc: " << std::flush;
  int tokens_seen = 0;
  int64_t expected_seq = 0;
  for (;;) {  // one iteration per game frame
    if (typing) {  // the player typed one more word this frame
      bool last = typed + 1 >= words.size();
      client.append(id, typed < words.size() ? " " + words[typed] : "", last);
      ++typed;
      typing = !last;
    }
    for (const npc::Event& e : client.poll(1.0)) {
      if (e.type == "connection") {
        std::cerr << (e.connected ? "[connected]\n" : "[connection lost]\n");
        continue;
      }
      if (e.id != id) continue;
      if (e.type == "token") {
        if (e.seq != expected_seq++) {
          std::cout << "\nerror: seq_gap expected " << expected_seq - 1 << " got " << e.seq << "\n";
          return 1;
        }
        std::cout << printable(e.text) << std::flush;
        if (++tokens_seen == cancel_after) client.cancel(id);
      } else if (e.type == "done") {
        std::cout << "\ndone: tokens=" << e.tokens << " fallback=" << e.fallback << " cancelled=" << e.cancelled
                  << " deflected=" << e.deflected << " messages=" << tokens_seen
                  << " ttft_ms=" << (e.stats.ttft_ms ? *e.stats.ttft_ms : -1.0) << " total_ms=" << e.stats.total_ms
                  << "\ntext: " << printable(e.text) << std::endl;
        return 0;
      } else if (e.type == "error") {
        std::cout << "\nerror: " << e.code << " " << e.message << (e.synthetic ? " (client-side)" : "") << std::endl;
        return 1;
      }
    }
    std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(frame_ms));  // render the frame
  }
}
