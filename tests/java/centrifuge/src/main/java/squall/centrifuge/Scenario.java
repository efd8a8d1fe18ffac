package squall.centrifuge;

import io.github.centrifugal.centrifuge.Client;
import io.github.centrifugal.centrifuge.ClientInfo;
import io.github.centrifugal.centrifuge.ConnectedEvent;
import io.github.centrifugal.centrifuge.ConnectingEvent;
import io.github.centrifugal.centrifuge.ConnectionTokenEvent;
import io.github.centrifugal.centrifuge.ConnectionTokenGetter;
import io.github.centrifugal.centrifuge.DisconnectedEvent;
import io.github.centrifugal.centrifuge.DuplicateSubscriptionException;
import io.github.centrifugal.centrifuge.ErrorEvent;
import io.github.centrifugal.centrifuge.EventListener;
import io.github.centrifugal.centrifuge.HistoryOptions;
import io.github.centrifugal.centrifuge.HistoryResult;
import io.github.centrifugal.centrifuge.JoinEvent;
import io.github.centrifugal.centrifuge.LeaveEvent;
import io.github.centrifugal.centrifuge.Options;
import io.github.centrifugal.centrifuge.PresenceResult;
import io.github.centrifugal.centrifuge.Publication;
import io.github.centrifugal.centrifuge.PublicationEvent;
import io.github.centrifugal.centrifuge.PublishResult;
import io.github.centrifugal.centrifuge.ReplyError;
import io.github.centrifugal.centrifuge.StreamPosition;
import io.github.centrifugal.centrifuge.SubscribedEvent;
import io.github.centrifugal.centrifuge.SubscribingEvent;
import io.github.centrifugal.centrifuge.Subscription;
import io.github.centrifugal.centrifuge.SubscriptionErrorEvent;
import io.github.centrifugal.centrifuge.SubscriptionEventListener;
import io.github.centrifugal.centrifuge.SubscriptionOptions;
import io.github.centrifugal.centrifuge.TokenCallback;
import io.github.centrifugal.centrifuge.UnsubscribedEvent;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import org.json.JSONArray;
import org.json.JSONException;
import org.json.JSONObject;

/**
 * One user's session with the real centrifuge-java SDK (Protobuf protocol), run by
 * tests/integration/test_sdk_centrifuge_java.py against Squall or the reference server.
 *
 * <p>It speaks JSON lines with the harness. On stdout: {"event": ...} for what the SDK
 * reported, {"request": ...} when it needs the harness (a connection token; publications
 * made while it is offline, and a server restart), then one reply line is read from stdin.
 * It ends with {"event": "done"} and exit code 0, or {"event": "fail", "reason": ...} and
 * exit code 1 at the first expectation that does not hold. Every wait has a deadline, and
 * a watchdog ends the whole program after --deadline seconds.
 *
 * <p>The scenario: connect (token from the harness); subscribe to a durable channel; publish
 * from the SDK and receive it back; presence (in a channel with presence) lists this client;
 * disconnect; the harness publishes N over HTTP and may restart the server; connect again: the
 * subscribed event says it was recovering and recovered, and exactly the N missed publications
 * arrive, in order, before the next live one; history holds all of them; and the connection
 * then stays up across server pings.
 */
public final class Scenario {
    private static final Object OUT = new Object();

    /** An expectation that does not hold. */
    static final class Failure extends Exception {
        private static final long serialVersionUID = 1L;

        Failure(String message) {
            super(message);
        }
    }

    static void emit(JSONObject line) {
        synchronized (OUT) {
            System.out.println(line.toString());
            System.out.flush();
        }
    }

    static JSONObject obj(Object... pairs) {
        JSONObject o = new JSONObject();
        for (int i = 0; i + 1 < pairs.length; i += 2) {
            o.put((String) pairs[i], pairs[i + 1] == null ? JSONObject.NULL : pairs[i + 1]);
        }
        return o;
    }

    static void event(String name, Object... pairs) {
        JSONObject o = obj(pairs);
        o.put("event", name);
        emit(o);
    }

    static String text(byte[] data) {
        return data == null ? null : new String(data, StandardCharsets.UTF_8);
    }

    static String describe(Throwable e) {
        if (e == null) {
            return "null";
        }
        if (e instanceof SubscriptionErrorEvent && e.getCause() != null) {
            return describe(e.getCause());
        }
        if (e.getCause() instanceof ReplyError) {
            return e.getClass().getSimpleName() + ": " + describe(e.getCause());
        }
        if (e instanceof ReplyError) {
            ReplyError r = (ReplyError) e;
            return "ReplyError code=" + r.getCode() + " message=" + r.getMessage()
                    + " temporary=" + r.isTemporary();
        }
        return e.getClass().getName() + ": " + e.getMessage();
    }

    static JSONObject info(ClientInfo info) {
        if (info == null) {
            return null;
        }
        return obj("user", info.getUser(), "client", info.getClient(),
                "conn_info", text(info.getConnInfo()), "chan_info", text(info.getChanInfo()));
    }

    /**
     * A field of a StreamPosition: this SDK version (0.4.1) keeps its getters package-private,
     * so an application cannot read them; the scenario reads them to check the server's reply.
     */
    static Object peek(StreamPosition pos, String field) {
        try {
            java.lang.reflect.Field f = StreamPosition.class.getDeclaredField(field);
            f.setAccessible(true);
            return f.get(pos);
        } catch (ReflectiveOperationException e) {
            return "unreadable: " + e;
        }
    }

    // ---- options ----------------------------------------------------------------------

    private final String url;
    private final String user;
    private final String channel;
    private final String presenceChannel;
    private final int offlineCount;
    private final int pingInterval;
    private final int pingDelayMs;
    private final long stepMs;

    // ---- what the SDK reported ---------------------------------------------------------

    private final BlockingQueue<String> replies = new LinkedBlockingQueue<>();
    private final BlockingQueue<JSONObject> connected = new LinkedBlockingQueue<>();
    private final BlockingQueue<JSONObject> disconnected = new LinkedBlockingQueue<>();
    private final Map<String, BlockingQueue<JSONObject>> subscribed = new ConcurrentHashMap<>();
    private final Map<String, BlockingQueue<JSONObject>> publications = new ConcurrentHashMap<>();
    /** Each distinct SDK error, with how often it came. */
    private final Map<String, Integer> errors = new LinkedHashMap<>();
    private volatile String fatal;
    private volatile boolean closing;
    private volatile long lastConnectedAt;
    private volatile boolean expectingConnect;

    Scenario(Map<String, String> args) {
        url = args.get("url");
        user = args.getOrDefault("user", "java-user");
        channel = args.getOrDefault("channel", "durable:log");
        presenceChannel = args.getOrDefault("presence-channel", "chat:java");
        offlineCount = Integer.parseInt(args.getOrDefault("offline", "5"));
        pingInterval = Integer.parseInt(args.getOrDefault("ping-interval", "5"));
        pingDelayMs = Integer.parseInt(args.getOrDefault("ping-delay-ms", "3000"));
        stepMs = (long) (Double.parseDouble(args.getOrDefault("step-timeout", "15")) * 1000);
        if (url == null) {
            throw new IllegalArgumentException("--url is required");
        }
    }

    private void fatal(String reason) {
        if (fatal == null) {
            fatal = reason;
        }
    }

    private void failIfFatal() throws Failure {
        if (fatal != null) {
            throw new Failure(fatal);
        }
    }

    private static void check(boolean condition, String reason) throws Failure {
        if (!condition) {
            throw new Failure(reason);
        }
    }

    private String errorsSoFar() {
        synchronized (errors) {
            if (errors.isEmpty()) {
                return "";
            }
            List<String> seen = new ArrayList<>();
            errors.forEach((what, n) -> seen.add(n > 1 ? what + " (x" + n + ")" : what));
            return "; SDK errors so far: " + String.join(" | ", seen);
        }
    }

    /** The next item of {@code queue}, or a Failure after the step timeout. */
    private <T> T take(BlockingQueue<T> queue, String what) throws Failure {
        long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(stepMs);
        while (true) {
            failIfFatal();
            try {
                T item = queue.poll(100, TimeUnit.MILLISECONDS);
                if (item != null) {
                    return item;
                }
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                throw new Failure("interrupted waiting for " + what);
            }
            if (System.nanoTime() > deadline) {
                throw new Failure("timed out after " + stepMs / 1000.0 + " s waiting for " + what
                        + errorsSoFar());
            }
        }
    }

    private <T> T await(CompletableFuture<T> future, String what) throws Failure {
        BlockingQueue<Object> box = new LinkedBlockingQueue<>();
        future.whenComplete((value, error) -> box.add(error != null ? error : value == null ? box : value));
        Object got = take(box, what);
        if (got instanceof Throwable) {
            throw new Failure(what + " failed: " + describe((Throwable) got));
        }
        @SuppressWarnings("unchecked")
        T value = got == box ? null : (T) got;
        return value;
    }

    private BlockingQueue<JSONObject> queue(Map<String, BlockingQueue<JSONObject>> map, String ch) {
        return map.computeIfAbsent(ch, k -> new LinkedBlockingQueue<>());
    }

    /** Ask the harness; one request at a time. */
    private synchronized JSONObject ask(JSONObject request) throws Failure {
        emit(request);
        String line = take(replies, "the harness to answer " + request.getString("request"));
        if (line.equals("\u0000EOF")) {
            throw new Failure("the harness closed stdin");
        }
        JSONObject reply;
        try {
            reply = new JSONObject(line);
        } catch (JSONException e) {
            throw new Failure("the harness answered with no JSON object: " + line);
        }
        if (reply.has("error")) {
            throw new Failure("the harness could not do " + request.getString("request") + ": "
                    + reply.get("error"));
        }
        return reply;
    }

    // ---- SDK listeners ---------------------------------------------------------------

    private EventListener clientListener() {
        return new EventListener() {
            @Override
            public void onConnecting(Client client, ConnectingEvent e) {
                event("connecting", "code", e.getCode(), "reason", e.getReason());
                // Code 0 is "connect called"; any other means the SDK lost the connection by
                // itself (transport closed, no ping, ...): nothing in this scenario should.
                if (e.getCode() != 0 && !closing) {
                    fatal("the SDK dropped the connection: connecting code=" + e.getCode()
                            + " reason=" + e.getReason() + errorsSoFar());
                }
            }

            @Override
            public void onConnected(Client client, ConnectedEvent e) {
                lastConnectedAt = System.nanoTime();
                JSONObject o = obj("client", e.getClient(), "data", text(e.getData()));
                event("connected", "client", e.getClient(), "data", text(e.getData()));
                if (!expectingConnect) {
                    fatal("connected when the scenario did not connect" + errorsSoFar());
                }
                connected.add(o);
            }

            @Override
            public void onDisconnected(Client client, DisconnectedEvent e) {
                event("disconnected", "code", e.getCode(), "reason", e.getReason());
                if (e.getCode() != 0 && !closing) {
                    fatal("the SDK was disconnected: code=" + e.getCode() + " reason="
                            + e.getReason() + errorsSoFar());
                }
                disconnected.add(obj("code", e.getCode(), "reason", e.getReason()));
            }

            @Override
            public void onError(Client client, ErrorEvent e) {
                String what = describe(e.getError());
                event("error", "error", what, "http_status", e.getHttpResponseCode());
                synchronized (errors) {
                    errors.merge(what + (e.getHttpResponseCode() != null
                            ? " (HTTP " + e.getHttpResponseCode() + ")" : ""), 1, Integer::sum);
                }
            }
        };
    }

    private SubscriptionEventListener subListener() {
        return new SubscriptionEventListener() {
            @Override
            public void onSubscribing(Subscription sub, SubscribingEvent e) {
                event("subscribing", "channel", sub.getChannel(), "code", e.getCode(),
                        "reason", e.getReason());
            }

            @Override
            public void onSubscribed(Subscription sub, SubscribedEvent e) {
                StreamPosition pos = e.getStreamPosition();
                JSONObject o = obj("channel", sub.getChannel(),
                        "was_recovering", e.wasRecovering(), "recovered", e.getRecovered(),
                        "recoverable", e.getRecoverable(), "positioned", e.getPositioned(),
                        "offset", pos == null ? null : peek(pos, "offset"),
                        "epoch", pos == null ? null : peek(pos, "epoch"),
                        "data", text(e.getData()));
                JSONObject line = new JSONObject(o.toString());
                line.put("event", "subscribed");
                emit(line);
                queue(subscribed, sub.getChannel()).add(o);
            }

            @Override
            public void onUnsubscribed(Subscription sub, UnsubscribedEvent e) {
                event("unsubscribed", "channel", sub.getChannel(), "code", e.getCode(),
                        "reason", e.getReason());
                if (!closing) {
                    fatal("unsubscribed from " + sub.getChannel() + ": code=" + e.getCode()
                            + " reason=" + e.getReason());
                }
            }

            @Override
            public void onError(Subscription sub, SubscriptionErrorEvent e) {
                String what = describe(e.getError());
                event("subscription_error", "channel", sub.getChannel(), "error", what);
                fatal("subscription to " + sub.getChannel() + " failed: " + what);
            }

            @Override
            public void onPublication(Subscription sub, PublicationEvent e) {
                JSONObject o = obj("channel", sub.getChannel(), "data", text(e.getData()),
                        "offset", e.getOffset(), "info", info(e.getInfo()));
                JSONObject line = new JSONObject(o.toString());
                line.put("event", "publication");
                emit(line);
                queue(publications, sub.getChannel()).add(o);
            }

            @Override
            public void onJoin(Subscription sub, JoinEvent e) {
                event("join", "channel", sub.getChannel(), "info", info(e.getInfo()));
            }

            @Override
            public void onLeave(Subscription sub, LeaveEvent e) {
                event("leave", "channel", sub.getChannel(), "info", info(e.getInfo()));
            }
        };
    }

    // ---- the scenario ------------------------------------------------------------------

    private static boolean sameJson(String got, Object expected) {
        try {
            Object parsed = new JSONObject("{\"v\":" + got + "}").get("v");
            if (parsed instanceof JSONObject && expected instanceof JSONObject) {
                return ((JSONObject) parsed).similar(expected);
            }
            if (parsed instanceof JSONArray && expected instanceof JSONArray) {
                return ((JSONArray) parsed).similar(expected);
            }
            return parsed.equals(expected);
        } catch (JSONException e) {
            return false;
        }
    }

    private CompletableFuture<Void> publish(Subscription sub, byte[] data) {
        CompletableFuture<Void> done = new CompletableFuture<>();
        sub.publish(data, (Throwable e, PublishResult r) -> {
            if (e != null) {
                done.completeExceptionally(e);
            } else {
                done.complete(null);
            }
        });
        return done;
    }

    /** Publish from the SDK and see exactly that publication come back next. */
    private JSONObject publishAndReceive(Subscription sub, String payload, long offsetAfter,
                                         String clientId, String what) throws Failure {
        byte[] data = payload.getBytes(StandardCharsets.UTF_8);
        await(publish(sub, data), "the publish reply (" + what + ")");
        event("published", "channel", sub.getChannel(), "data", payload);
        JSONObject pub = take(queue(publications, sub.getChannel()), "the SDK's own publication ("
                + what + ") to come back");
        check(payload.equals(pub.optString("data")),
                "expected the publication " + payload + " next (" + what + "), got " + pub);
        if (offsetAfter >= 0) {
            check(pub.getLong("offset") == offsetAfter + 1, "the publication (" + what
                    + ") should have offset " + (offsetAfter + 1) + ", got " + pub);
        }
        JSONObject info = pub.optJSONObject("info");
        check(info != null && user.equals(info.optString("user"))
                        && clientId.equals(info.optString("client")),
                "a client's publication should carry its publisher's info (user " + user
                        + ", client " + clientId + "), got " + pub);
        return pub;
    }

    private Subscription newSub(Client client, String ch) throws Failure {
        try {
            return client.newSubscription(ch, new SubscriptionOptions(), subListener());
        } catch (DuplicateSubscriptionException e) {
            throw new Failure("a second subscription to " + ch);
        }
    }

    private JSONObject connect(Client client, String what) throws Failure {
        expectingConnect = true;
        client.connect();
        JSONObject c = take(connected, "connected (" + what + ")");
        expectingConnect = false;
        check(!c.optString("client").isEmpty(), "the connect reply carries no client id: " + c);
        return c;
    }

    void run() throws Failure, InterruptedException {
        Options opts = new Options();
        opts.setTimeout((int) Math.min(stepMs, 10000));
        opts.setMaxServerPingDelay(pingDelayMs);
        opts.setTokenGetter(new ConnectionTokenGetter() {
            @Override
            public void getConnectionToken(ConnectionTokenEvent e, TokenCallback cb) {
                try {
                    cb.Done(null, ask(obj("request", "token", "user", user)).getString("token"));
                } catch (Failure | JSONException err) {
                    fatal("no connection token: " + err.getMessage());
                    cb.Done(err, null);
                }
            }
        });
        Client client = new Client(url, opts, clientListener());
        try {
            scenario(client);
        } finally {
            closing = true;
            client.close(2000);
        }
    }

    private void scenario(Client client) throws Failure {
        // 1. Connect with a token from the harness.
        event("step", "name", "connect");
        String clientId = connect(client, "first connect").getString("client");

        // 2. Subscribe to the durable channel.
        event("step", "name", "subscribe");
        Subscription sub = newSub(client, channel);
        sub.subscribe();
        JSONObject s = take(queue(subscribed, channel), "subscribed to " + channel);
        check(!s.optBoolean("was_recovering") && !s.optBoolean("recovered"),
                "a first subscribe is not a recovery: " + s);
        check(s.optBoolean("recoverable"), "the subscribe reply should say recoverable=true "
                + "(the namespace forces recovery; without it the SDK never asks to recover): " + s);
        check(!s.optString("epoch").isEmpty(), "the subscribe reply should carry an epoch: " + s);
        long offset = s.optLong("offset");

        // 3. Publish from the SDK and receive it.
        event("step", "name", "publish");
        JSONObject first = publishAndReceive(sub, "{\"from\":\"java\",\"n\":0}", offset, clientId,
                "first");
        offset = first.getLong("offset");

        // 4. Presence (in a channel with presence) lists this client.
        event("step", "name", "presence");
        Subscription room = newSub(client, presenceChannel);
        room.subscribe();
        take(queue(subscribed, presenceChannel), "subscribed to " + presenceChannel);
        CompletableFuture<PresenceResult> presence = new CompletableFuture<>();
        room.presence((Throwable e, PresenceResult r) -> {
            if (e != null) {
                presence.completeExceptionally(e);
            } else {
                presence.complete(r);
            }
        });
        Map<String, ClientInfo> clients = await(presence, "presence in " + presenceChannel)
                .getClients();
        JSONObject shown = new JSONObject();
        for (Map.Entry<String, ClientInfo> entry : clients.entrySet()) {
            shown.put(entry.getKey(), info(entry.getValue()));
        }
        event("presence", "channel", presenceChannel, "clients", shown);
        ClientInfo me = clients.get(clientId);
        check(me != null && user.equals(me.getUser()) && clientId.equals(me.getClient()),
                "presence should list this client (" + clientId + ", user " + user + "): " + shown);

        // 5. Go offline; the harness publishes while we are away (and may restart the server).
        event("step", "name", "offline");
        client.disconnect();
        JSONObject d = take(disconnected, "disconnected");
        check(d.getInt("code") == 0, "disconnect() should end with code 0: " + d);
        JSONObject reply = ask(obj("request", "publish_offline", "channel", channel,
                "count", offlineCount));
        JSONArray sent = reply.getJSONArray("publications");
        check(sent.length() == offlineCount, "the harness published " + sent.length()
                + ", not " + offlineCount);

        // 6. Reconnect: the subscription recovers exactly the missed publications, in order.
        event("step", "name", "recover", "restarted", reply.optBoolean("restarted"));
        clientId = connect(client, "reconnect").getString("client");
        JSONObject r = take(queue(subscribed, channel), "resubscribed to " + channel);
        check(r.optBoolean("was_recovering"), "the resubscribe should say wasRecovering: " + r);
        check(r.optBoolean("recovered"), "the resubscribe should say recovered: " + r);
        check(r.optString("epoch").equals(s.optString("epoch")),
                "the epoch should not change (first " + s.optString("epoch") + "): " + r);
        for (int i = 0; i < sent.length(); i++) {
            JSONObject want = sent.getJSONObject(i);
            JSONObject got = take(queue(publications, channel), "recovered publication "
                    + (i + 1) + " of " + sent.length());
            check(sameJson(got.optString("data"), want.get("data")), "recovered publication "
                    + (i + 1) + " should be " + want + ", got " + got);
            check(got.getLong("offset") == want.getLong("offset")
                            && got.getLong("offset") == offset + 1,
                    "recovered publication " + (i + 1) + " should have offset "
                            + want.getLong("offset") + " (one after " + offset + "), got " + got);
            offset = got.getLong("offset");
        }
        // Nothing else was recovered: the next publication is a new live one.
        JSONObject last = publishAndReceive(sub, "{\"from\":\"java\",\"n\":\"after\"}", offset,
                clientId, "after recovery");
        offset = last.getLong("offset");

        // 7. History holds all of them, in order.
        event("step", "name", "history");
        CompletableFuture<HistoryResult> history = new CompletableFuture<>();
        sub.history(new HistoryOptions.Builder().withLimit(100).build(),
                (Throwable e, HistoryResult h) -> {
                    if (e != null) {
                        history.completeExceptionally(e);
                    } else {
                        history.complete(h);
                    }
                });
        HistoryResult h = await(history, "history of " + channel);
        List<String> got = new ArrayList<>();
        long previous = 0;
        for (Publication p : h.getPublications()) {
            got.add(p.getOffset() + ":" + text(p.getData()).replaceAll("\\s", ""));
            check(p.getOffset() > previous, "history offsets should increase: " + got);
            previous = p.getOffset();
        }
        event("history", "channel", channel, "publications", new JSONArray(got),
                "offset", h.getOffset(), "epoch", h.getEpoch());
        check(h.getPublications().size() == sent.length() + 2, "history should hold "
                + (sent.length() + 2) + " publications, got " + got);
        check(h.getOffset() == offset, "history's stream offset should be " + offset + ", got "
                + h.getOffset());

        // 8. The connection stays up across server pings: the SDK gives up after
        // ping interval + ping delay without a ping, and the server after a missed pong.
        event("step", "name", "pings");
        long window = TimeUnit.SECONDS.toNanos(pingInterval) + TimeUnit.MILLISECONDS.toNanos(
                pingDelayMs + 1000L);
        long until = lastConnectedAt + window;
        while (System.nanoTime() < until) {
            failIfFatal();
            try {
                Thread.sleep(100);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                throw new Failure("interrupted");
            }
        }
        failIfFatal();
        check(disconnected.isEmpty() && connected.isEmpty(),
                "the connection should stay up across server pings");
        event("step", "name", "end");
    }

    static Map<String, String> parseArgs(String[] argv) {
        Map<String, String> args = new HashMap<>();
        for (int i = 0; i < argv.length; i++) {
            if (!argv[i].startsWith("--") || i + 1 >= argv.length) {
                throw new IllegalArgumentException("bad arguments: " + Arrays.toString(argv));
            }
            args.put(argv[i].substring(2), argv[++i]);
        }
        return args;
    }

    public static void main(String[] argv) {
        Map<String, String> args = parseArgs(argv);
        double deadline = Double.parseDouble(args.getOrDefault("deadline", "120"));
        Thread watchdog = new Thread(() -> {
            try {
                Thread.sleep((long) (deadline * 1000));
            } catch (InterruptedException e) {
                return;
            }
            event("fail", "reason", "the whole scenario took over " + deadline + " s");
            Runtime.getRuntime().halt(3);
        }, "watchdog");
        watchdog.setDaemon(true);
        watchdog.start();

        Scenario scenario = new Scenario(args);
        Thread stdin = new Thread(() -> {
            try (BufferedReader in = new BufferedReader(
                    new InputStreamReader(System.in, StandardCharsets.UTF_8))) {
                String line;
                while ((line = in.readLine()) != null) {
                    if (!line.isBlank()) {
                        scenario.replies.add(line);
                    }
                }
            } catch (java.io.IOException ignored) {
                // Treated as end of input.
            }
            scenario.replies.add("\u0000EOF");
        }, "stdin");
        stdin.setDaemon(true);
        stdin.start();

        int code = 0;
        try {
            scenario.run();
            event("done", "ok", true);
        } catch (Failure e) {
            event("fail", "reason", e.getMessage());
            code = 1;
        } catch (Exception e) {
            event("fail", "reason", "unexpected " + describe(e));
            e.printStackTrace();
            code = 1;
        }
        System.out.flush();
        // OkHttp's threads would keep the JVM alive for a while.
        Runtime.getRuntime().halt(code);
    }
}
