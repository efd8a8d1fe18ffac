// The demo room: messages, presence and typing on Squall, with recovery.
import { Squall } from "./squall.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const ROOM = "demo:room";
const TYPING = "demo_live:typing";

const name = params.get("name") || localStorage.getItem("squall-demo-name") ||
  `guest-${Math.random().toString(36).slice(2, 6)}`;
$("name").value = name;
$("name").addEventListener("change", () => {
  localStorage.setItem("squall-demo-name", $("name").value);
  location.search = `?name=${encodeURIComponent($("name").value)}`;
});

const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/connection/websocket`;
const transports = params.get("transport") === "sse" ? ["sse"] : ["websocket", "sse"];
const squall = new Squall(wsUrl, {
  transports,
  minReconnectDelay: 300,
  maxReconnectDelay: 3000,
  getToken: async () => {
    const res = await fetch("/demo/token", { method: "POST", body: JSON.stringify({ user: name }) });
    return (await res.json()).token;
  },
});

let received = 0;
let gaps = 0;
let recovering = false;
let everConnected = false;
const people = new Map();

function renderPeople() {
  $("people").replaceChildren(...[...new Set(people.values())].sort().map((n) => {
    const li = document.createElement("li");
    li.textContent = n;
    return li;
  }));
}

function addMessage(pub) {
  const li = document.createElement("li");
  li.dataset.offset = pub.offset;
  if (recovering) li.classList.add("recovered");
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = pub.data.user;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = pub.data.text;
  const offset = document.createElement("span");
  offset.className = "offset";
  offset.textContent = `#${pub.offset}`;
  li.append(offset, who, text);
  $("messages").append(li);
  $("messages").scrollTop = $("messages").scrollHeight;
  received += 1;
  $("count").textContent = received;
  $("last").textContent = pub.offset;
}

squall.on("state", ({ state }) => {
  $("state").textContent = state;
  $("state").className = `pill ${state === "connected" ? "ok" : state === "connecting" ? "warn" : "bad"}`;
  if (state === "disconnected") everConnected = everConnected || squall.client !== null;
  // Coming back (not the first connect): what arrives with the subscribe
  // reply is what was missed, and is tinted.
  if (state === "connecting" && everConnected) recovering = true;
});
squall.on("connected", ({ transport }) => {
  everConnected = true;
  $("transport").textContent = transport;
  document.body.dataset.transport = transport;
});

const room = squall.subscribe(ROOM, {
  publication: addMessage,
  subscribed: async ({ recovered }) => {
    if (recovered === false) {
      gaps += 1;
      $("gaps").textContent = gaps;
      $("notice").textContent = "Some messages could not be recovered.";
    }
    recovering = false; // the recovered publications came with the reply
    document.body.dataset.subscribed = "yes";
    if (squall.transport === "websocket") {
      try {
        const members = await squall.presence(ROOM);
        people.clear();
        for (const [client, info] of Object.entries(members)) people.set(client, info.user);
        renderPeople();
      } catch { /* presence is optional */ }
    }
  },
  join: (info) => { people.set(info.client, info.user); renderPeople(); },
  leave: (info) => { people.delete(info.client); renderPeople(); },
});

// Without a position, the room starts from its recent history.
room.on("subscribed", async function loadOnce() {
  room.off("subscribed", loadOnce);
  if (squall.transport !== "websocket" || received) return;
  const history = await squall.history(ROOM, { limit: 50, reverse: true });
  const live = [...$("messages").children];
  for (const pub of history.publications.reverse()) addMessage(pub);
  $("messages").append(...live); // anything live that came meanwhile stays last
});

const typers = new Map();
squall.subscribe(TYPING, {
  publication: (pub) => {
    if (pub.data.user === name) return;
    typers.set(pub.data.user, Date.now());
  },
});
setInterval(() => {
  const now = Date.now();
  const names = [...typers].filter(([, t]) => now - t < 3000).map(([n]) => n);
  $("typing").textContent = names.length ? `${names.join(", ")} ${names.length > 1 ? "are" : "is"} typing…` : "";
}, 500);

let lastTyping = 0;
$("text").addEventListener("input", () => {
  if (Date.now() - lastTyping > 1500 && squall.transport === "websocket") {
    lastTyping = Date.now();
    squall.publish(TYPING, { user: name }).catch(() => {});
  }
});

$("send").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  // Clear at once, so typing the next message can start while this one is
  // on its way; put it back if it could not be sent.
  $("text").value = "";
  try {
    await squall.publish(ROOM, { user: name, text });
    $("notice").textContent = "";
  } catch (error) {
    if (!$("text").value) $("text").value = text;
    $("notice").textContent = `Not sent: ${error.reason || error.message}`;
  }
});

$("offline").addEventListener("click", () => {
  if (squall.state === "disconnected") {
    squall.connect();
    $("offline").textContent = "Go offline";
  } else {
    squall.disconnect();
    $("offline").textContent = "Come back";
  }
});

window.squallDemo = squall; // for the console (and the end-to-end tests)
squall.connect();
