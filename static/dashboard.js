// The operations dashboard: polls /status (with its ETag, so an unchanged
// snapshot costs a 304), the cluster view, and the busiest channels.
const $ = (id) => document.getElementById(id);
const fmt = (n) => (n >= 1000 ? n.toLocaleString("en-US", { maximumFractionDigits: 0 }) : String(Math.round(n * 10) / 10));
let etag = null;
let plot = null;

function uptime(s) {
  if (s < 120) return `${Math.round(s)} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function chartWidth() {
  // The card's inner width: the chart must shrink with a phone's screen.
  const card = $("chart").parentElement;
  return Math.max(240, card.clientWidth - 32);
}

function chart(series) {
  const data = [series.map((p) => p.t), series.map((p) => p.publications_in), series.map((p) => p.deliveries)];
  const width = chartWidth();
  if (!plot) {
    plot = new uPlot({
      width, height: 240,
      series: [{}, { label: "pubs in/s", stroke: "#2563eb", width: 2 }, { label: "deliveries/s", stroke: "#15803d", width: 2 }],
      axes: [{}, { size: 60 }],
    }, data, $("chart"));
    window.addEventListener("resize", () => plot.setSize({ width: chartWidth(), height: 240 }));
  } else {
    plot.setData(data);
  }
}

async function pollStatus() {
  const headers = etag ? { "If-None-Match": etag } : {};
  const res = await fetch("/status", { headers, cache: "no-store" });
  if (res.status === 304) return;
  etag = res.headers.get("ETag");
  const s = await res.json();
  $("connections").textContent = fmt(s.connections);
  $("subscriptions").textContent = fmt(s.subscriptions);
  $("pubs_in").textContent = fmt(s.rates.publications_in);
  $("deliveries").textContent = fmt(s.rates.deliveries);
  const ok = !s.draining && s.broker.healthy && s.store.healthy;
  $("health").textContent = s.draining ? "draining" : ok ? "healthy" : "degraded";
  $("health").className = `pill ${ok ? "ok" : "bad"}`;
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  document.body.dataset.connections = s.connections;
  chart(s.series);
}

async function pollCluster() {
  const res = await fetch("/status?scope=cluster", { cache: "no-store" });
  const c = await res.json();
  $("nodes").textContent = c.totals.nodes;
  $("node-rows").replaceChildren(...c.nodes.map((n) => {
    const tr = document.createElement("tr");
    tr.append(cell(n.node), cell(fmt(n.connections)), cell(fmt(n.subscriptions)),
      cell(fmt(n.rates.publications_in)), cell(fmt(n.rates.deliveries)), cell(uptime(n.uptime)),
      cell(n.draining ? "draining" : "serving"));
    return tr;
  }));
}

async function pollChannels() {
  const res = await fetch("/dashboard/data", { cache: "no-store" });
  if (res.redirected || res.status === 403) { location.href = "/dashboard/login"; return; }
  const d = await res.json();
  $("channels").replaceChildren(...d.channels.map((c) => {
    const tr = document.createElement("tr");
    tr.append(cell(c.channel), cell(fmt(c.subscribers)));
    return tr;
  }));
}

async function tick() {
  await Promise.allSettled([pollStatus(), pollCluster(), pollChannels()]);
  document.body.dataset.ready = "yes";
}
tick();
setInterval(tick, 2000);
