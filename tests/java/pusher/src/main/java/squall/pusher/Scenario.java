package squall.pusher;

import com.pusher.client.AuthorizationFailureException;
import com.pusher.client.ChannelAuthorizer;
import com.pusher.client.Pusher;
import com.pusher.client.PusherOptions;
import com.pusher.client.channel.Channel;
import com.pusher.client.channel.PresenceChannel;
import com.pusher.client.channel.PresenceChannelEventListener;
import com.pusher.client.channel.PrivateChannel;
import com.pusher.client.channel.PusherEvent;
import com.pusher.client.channel.User;
import com.pusher.client.connection.ConnectionEventListener;
import com.pusher.client.connection.ConnectionState;
import com.pusher.client.connection.ConnectionStateChange;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.function.Predicate;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;
import org.json.JSONArray;
import org.json.JSONException;
import org.json.JSONObject;

/**
 * The real pusher-websocket-java SDK (com.pusher:pusher-java-client, the Android SDK, on the
 * JVM), run by tests/integration/test_sdk_pusher_java.py against Squall's Pusher endpoint.
 *
 * <p>It speaks JSON lines with the harness. On stdout: {"event": ...} for what the SDK reported,
 * and {"request": {"op": ...}, "id": N} when the harness must publish an event; one reply line
 * {"id": N, "result"|"error": ...} is then read from stdin. It ends with {"event": "done"} and
 * exit code 0, or {"event": "fail", "reason": ...} and exit code 1 at the first expectation
 * that does not hold. Every wait has a deadline, and a watchdog ends the whole program after
 * --deadline seconds.
 *
 * <p>Private and presence channels are authorized through the SDK's ChannelAuthorizer, which
 * signs here with the app's secret as a Pusher server SDK would: key:HMAC-SHA256(secret,
 * socket_id:channel[:channel_data]).
 *
 * <p>The scenario: connect; a public channel and an event on it; a private channel (the
 * authorizer asked with this connection's socket id) and an event; a presence channel: the
 * member list, a second client (another user) added, its client event carrying its user id and
 * not echoed to it, an event to both, and the second client removed when it disconnects.
 */
public final class Scenario {
    private static final Object OUT = new Object();
    private static final long STEP_MS = 15000;

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

    static void check(boolean condition, String message) throws Failure {
        if (!condition) {
            throw new Failure(message);
        }
    }

    /** JSON text that must hold the same value as {@code expected}. */
    static void sameJson(String actual, Object expected, String what) throws Failure {
        Object parsed;
        try {
            parsed = actual == null ? null : new JSONObject(actual);
        } catch (JSONException e) {
            throw new Failure(what + ": not a JSON object: " + actual);
        }
        boolean same = parsed instanceof JSONObject && ((JSONObject) parsed).similar(expected);
        check(same, what + ": got " + actual + ", expected " + expected);
    }

    static String hmacHex(String secret, String message) {
        try {
            Mac mac = Mac.getInstance("HmacSHA256");
            mac.init(new SecretKeySpec(secret.getBytes(StandardCharsets.UTF_8), "HmacSHA256"));
            byte[] digest = mac.doFinal(message.getBytes(StandardCharsets.UTF_8));
            StringBuilder hex = new StringBuilder();
            for (byte b : digest) {
                hex.append(String.format("%02x", b));
            }
            return hex.toString();
        } catch (java.security.GeneralSecurityException e) {
            throw new IllegalStateException(e);
        }
    }

    // ---- what a client observed ------------------------------------------------------

    /** Everything a client reported, in order; waits find the first match not yet taken. */
    static final class Observed {
        private final List<JSONObject> all = new ArrayList<>();
        private final Set<Integer> taken = new HashSet<>();

        synchronized void add(JSONObject o) {
            all.add(o);
            notifyAll();
        }

        synchronized JSONObject await(Predicate<JSONObject> match, String what) throws Failure {
            long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(STEP_MS);
            while (true) {
                for (int i = 0; i < all.size(); i++) {
                    if (!taken.contains(i) && match.test(all.get(i))) {
                        taken.add(i);
                        return all.get(i);
                    }
                }
                long left = deadline - System.nanoTime();
                if (left <= 0) {
                    throw new Failure("timed out after " + STEP_MS + " ms waiting for " + what);
                }
                try {
                    TimeUnit.NANOSECONDS.timedWait(this, left);
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                    throw new Failure("interrupted waiting for " + what);
                }
            }
        }

        synchronized List<JSONObject> matching(Predicate<JSONObject> match) {
            List<JSONObject> out = new ArrayList<>();
            for (JSONObject o : all) {
                if (match.test(o)) {
                    out.add(o);
                }
            }
            return out;
        }
    }

    static Predicate<JSONObject> kind(String kind, String channel) {
        return o -> kind.equals(o.optString("kind")) && (channel == null || channel.equals(o.optString("channel")));
    }

    static Predicate<JSONObject> eventNamed(String channel, String name) {
        return o -> "event".equals(o.optString("kind")) && channel.equals(o.optString("channel"))
                && name.equals(o.optString("name"));
    }

    /** One Pusher client of one user, and all it reports. */
    static final class SdkClient implements ConnectionEventListener, PresenceChannelEventListener {
        final String label;
        final String userId;
        final JSONObject userInfo;
        final Pusher pusher;
        final Observed seen = new Observed();
        final List<JSONObject> authCalls = new ArrayList<>();
        private final String key;
        private final String secret;

        SdkClient(String label, String host, int port, String key, String secret, String userId,
                JSONObject userInfo) {
            this.label = label;
            this.key = key;
            this.secret = secret;
            this.userId = userId;
            this.userInfo = userInfo;
            ChannelAuthorizer authorizer = this::authorize;
            PusherOptions options = new PusherOptions()
                    .setHost(host)
                    .setWsPort(port)
                    .setUseTLS(false)
                    .setChannelAuthorizer(authorizer);
            this.pusher = new Pusher(key, options);
        }

        /** The SDK's ChannelAuthorizer: the JSON a Pusher auth endpoint would answer. */
        String authorize(String channelName, String socketId) throws AuthorizationFailureException {
            synchronized (authCalls) {
                authCalls.add(obj("channel", channelName, "socket_id", socketId));
            }
            record("authorize", "channel", channelName, "socket_id", socketId);
            JSONObject answer = new JSONObject();
            String message = socketId + ":" + channelName;
            if (channelName.startsWith("presence-")) {
                String channelData = obj("user_id", userId, "user_info", userInfo).toString();
                message += ":" + channelData;
                answer.put("channel_data", channelData);
            }
            answer.put("auth", key + ":" + hmacHex(secret, message));
            return answer.toString();
        }

        void record(String kind, Object... pairs) {
            JSONObject o = obj(pairs);
            o.put("kind", kind);
            seen.add(o);
            JSONObject line = new JSONObject(o.toString());
            line.put("event", label + "." + kind);
            emit(line);
        }

        void connect() {
            pusher.connect(this, ConnectionState.ALL);
        }

        String connected() throws Failure {
            seen.await(o -> "state".equals(o.optString("kind")) && "CONNECTED".equals(o.optString("current")),
                    label + " to connect");
            String socketId = pusher.getConnection().getSocketId();
            check(socketId != null && socketId.matches("\\d+\\.\\d+"),
                    label + "'s socket_id is Pusher-shaped: " + socketId);
            return socketId;
        }

        void disconnected() throws Failure {
            seen.await(o -> "state".equals(o.optString("kind")) && "DISCONNECTED".equals(o.optString("current")),
                    label + " to disconnect");
        }

        @Override
        public void onConnectionStateChange(ConnectionStateChange change) {
            record("state", "previous", change.getPreviousState().name(), "current",
                    change.getCurrentState().name(), "socket_id", pusher.getConnection().getSocketId());
        }

        @Override
        public void onError(String message, String code, Exception e) {
            record("error", "message", message, "code", code, "exception", e == null ? null : e.toString());
        }

        @Override
        public void onSubscriptionSucceeded(String channelName) {
            record("subscribed", "channel", channelName);
        }

        @Override
        public void onEvent(PusherEvent e) {
            record("event", "channel", e.getChannelName(), "name", e.getEventName(), "data", e.getData(),
                    "user_id", e.getUserId());
        }

        @Override
        public void onError(String message, Exception e) {
            record("channel_error", "message", message, "exception", e == null ? null : e.toString());
        }

        @Override
        public void onAuthenticationFailure(String message, Exception e) {
            record("auth_failure", "message", message, "exception", e == null ? null : e.toString());
        }

        @Override
        public void onUsersInformationReceived(String channelName, Set<User> users) {
            record("users", "channel", channelName, "users", usersJson(users));
        }

        @Override
        public void userSubscribed(String channelName, User user) {
            record("member_added", "channel", channelName, "id", user.getId(), "info", user.getInfo());
        }

        @Override
        public void userUnsubscribed(String channelName, User user) {
            record("member_removed", "channel", channelName, "id", user.getId(), "info", user.getInfo());
        }
    }

    static JSONArray usersJson(Set<User> users) {
        JSONArray out = new JSONArray();
        for (User u : users) {
            out.put(obj("id", u.getId(), "info", u.getInfo()));
        }
        return out;
    }

    /** The members as the SDK holds them: id to info (JSON text). */
    static Map<String, String> members(Set<User> users) {
        Map<String, String> out = new HashMap<>();
        for (User u : users) {
            out.put(u.getId(), u.getInfo());
        }
        return out;
    }

    // ---- the harness --------------------------------------------------------------

    private final BlockingQueue<String> replies = new LinkedBlockingQueue<>();
    private int requestId;
    private final String host;
    private final int port;
    private final String key;
    private final String secret;

    Scenario(String host, int port, String key, String secret) {
        this.host = host;
        this.port = port;
        this.key = key;
        this.secret = secret;
    }

    private synchronized JSONObject ask(String op, Object... pairs) throws Failure {
        JSONObject request = obj(pairs);
        request.put("op", op);
        int id = ++requestId;
        emit(obj("request", request, "id", id));
        String line;
        try {
            line = replies.poll(30, TimeUnit.SECONDS);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new Failure("interrupted waiting for the harness");
        }
        if (line == null) {
            throw new Failure("timed out waiting for the harness to answer " + op);
        }
        JSONObject reply = new JSONObject(line);
        check(reply.optInt("id") == id, "a reply to request " + id + ": " + line);
        if (reply.has("error")) {
            throw new Failure("the harness could not " + op + ": " + reply.get("error"));
        }
        return reply;
    }

    private void publish(String channel, String eventName, JSONObject data) throws Failure {
        ask("publish", "channel", channel, "event", eventName, "data", data.toString());
    }

    private SdkClient client(String label, String userId, JSONObject info) {
        return new SdkClient(label, host, port, key, secret, userId, info);
    }

    // ---- the scenario ------------------------------------------------------------------

    void run() throws Failure {
        JSONObject javaInfo = obj("name", "Java");
        JSONObject peerInfo = obj("name", "Peer", "sdk", "pusher-java-client");
        SdkClient main = client("java", "java-user", javaInfo);
        main.connect();
        String socketId = main.connected();
        event("connected", "socket_id", socketId);

        // A public channel.
        Channel pub = main.pusher.subscribe("java-public", main, "my-event");
        main.seen.await(kind("subscribed", "java-public"), "subscribed to java-public");
        check(pub.isSubscribed(), "java-public isSubscribed()");
        publish("java-public", "my-event", obj("n", 1));
        JSONObject got = main.seen.await(eventNamed("java-public", "my-event"), "my-event on java-public");
        sameJson(got.optString("data", null), obj("n", 1), "my-event data");
        step("public");

        // A private channel, authorized for this connection.
        PrivateChannel priv = main.pusher.subscribePrivate("private-java", main, "secret-event");
        main.seen.await(kind("subscribed", "private-java"), "subscribed to private-java");
        check(priv.isSubscribed(), "private-java isSubscribed()");
        synchronized (main.authCalls) {
            check(main.authCalls.size() == 1
                    && main.authCalls.get(0).similar(obj("channel", "private-java", "socket_id", socketId)),
                    "the authorizer was asked for private-java with this socket id: " + main.authCalls);
        }
        publish("private-java", "secret-event", obj("s", 1));
        got = main.seen.await(eventNamed("private-java", "secret-event"), "secret-event on private-java");
        sameJson(got.optString("data", null), obj("s", 1), "secret-event data");
        step("private");

        // A presence channel: alone first, then a second user comes and goes.
        String presence = "presence-java";
        PresenceChannel pres = main.pusher.subscribePresence(presence, main, "client-moved", "announce");
        JSONObject users = main.seen.await(kind("users", presence), "the member list of " + presence);
        main.seen.await(kind("subscribed", presence), "subscribed to " + presence);
        check(users.getJSONArray("users").length() == 1, "one member on subscribing: " + users);
        check(pres.getMe() != null && "java-user".equals(pres.getMe().getId()), "getMe(): " + pres.getMe());
        sameJson(pres.getMe().getInfo(), javaInfo, "getMe() info");

        SdkClient peer = client("peer", "java-peer", peerInfo);
        peer.connect();
        peer.connected();
        PresenceChannel peerPres = peer.pusher.subscribePresence(presence, peer, "client-moved", "announce");
        JSONObject peerUsers = peer.seen.await(kind("users", presence), "the peer's member list");
        peer.seen.await(kind("subscribed", presence), "the peer subscribed to " + presence);
        check(peerUsers.getJSONArray("users").length() == 2, "two members for the peer: " + peerUsers);
        Map<String, String> peerView = members(peerPres.getUsers());
        check(peerView.keySet().equals(Set.of("java-user", "java-peer")), "the peer's members: " + peerView);
        sameJson(peerView.get("java-user"), javaInfo, "java-user's info as the peer sees it");

        JSONObject added = main.seen.await(kind("member_added", presence), "java-peer added");
        check("java-peer".equals(added.optString("id")), "member_added id: " + added);
        sameJson(added.optString("info", null), peerInfo, "member_added info");
        check(members(pres.getUsers()).size() == 2, "two members after the peer came: " + pres.getUsers());

        // A client event from the peer: to the main client with the peer's user id.
        peerPres.trigger("client-moved", obj("x", 1).toString());
        got = main.seen.await(eventNamed(presence, "client-moved"), "the peer's client event");
        sameJson(got.optString("data", null), obj("x", 1), "client event data");
        check("java-peer".equals(got.optString("user_id")), "client event user_id: " + got);
        // A server event after it reaches both; the peer's own client event, were it
        // echoed, would have come to the peer before it.
        publish(presence, "announce", obj("to", "all"));
        got = main.seen.await(eventNamed(presence, "announce"), "announce on the main client");
        sameJson(got.optString("data", null), obj("to", "all"), "announce data");
        peer.seen.await(eventNamed(presence, "announce"), "announce on the peer");
        check(peer.seen.matching(eventNamed(presence, "client-moved")).isEmpty(),
                "the peer's client event was not echoed to it");
        step("presence");

        peer.pusher.disconnect();
        peer.disconnected();
        JSONObject removed = main.seen.await(kind("member_removed", presence), "java-peer removed");
        check("java-peer".equals(removed.optString("id")), "member_removed id: " + removed);
        check(members(pres.getUsers()).keySet().equals(Set.of("java-user")),
                "members after the peer left: " + members(pres.getUsers()));
        step("member_removed");

        check(main.seen.matching(kind("error", null)).isEmpty(), "connection errors: "
                + main.seen.matching(kind("error", null)));
        check(main.seen.matching(kind("auth_failure", null)).isEmpty(), "authorization failures");
        main.pusher.disconnect();
        main.disconnected();
    }

    static void step(String name) {
        event("step", "name", name);
    }

    public static void main(String[] args) {
        Map<String, String> opts = new HashMap<>();
        for (int i = 0; i + 1 < args.length; i += 2) {
            opts.put(args[i].replaceFirst("^--", ""), args[i + 1]);
        }
        long deadlineSeconds = Long.parseLong(opts.getOrDefault("deadline", "90"));
        Scenario scenario = new Scenario(opts.getOrDefault("host", "127.0.0.1"),
                Integer.parseInt(opts.get("port")), opts.get("key"), opts.get("secret"));

        Thread reader = new Thread(() -> {
            try (BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8))) {
                String line;
                while ((line = in.readLine()) != null) {
                    if (!line.isBlank()) {
                        scenario.replies.add(line);
                    }
                }
            } catch (java.io.IOException e) {
                // stdin closed: the harness is gone; the watchdog ends us
            }
        }, "harness-reader");
        reader.setDaemon(true);
        reader.start();

        Thread watchdog = new Thread(() -> {
            try {
                Thread.sleep(TimeUnit.SECONDS.toMillis(deadlineSeconds));
            } catch (InterruptedException e) {
                return;
            }
            event("fail", "reason", "the whole scenario took longer than " + deadlineSeconds + " s");
            Runtime.getRuntime().halt(1);
        }, "watchdog");
        watchdog.setDaemon(true);
        watchdog.start();

        event("start", "sdk", "pusher-java-client " + PusherOptions.LIB_VERSION);
        try {
            scenario.run();
        } catch (Failure f) {
            event("fail", "reason", f.getMessage());
            Runtime.getRuntime().halt(1);
        } catch (RuntimeException e) {
            event("fail", "reason", "unexpected " + e);
            Runtime.getRuntime().halt(1);
        }
        event("done");
        Runtime.getRuntime().halt(0);
    }
}
