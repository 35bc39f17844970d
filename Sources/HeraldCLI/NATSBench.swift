import ArgumentParser
import Foundation
import Herald
import HeraldBroker
import HeraldClient
import HeraldNATS
import Logging

#if canImport(Glibc)
    import Glibc
#endif

/// The same workload against Herald's broker and against NATS JetStream in one run: acked publish, consume + ack,
/// end-to-end latency at a fixed rate. JetStream runs twice (file storage; its default sync, then
/// `sync_interval: always`, which fsyncs before it acknowledges as the broker does); the command starts each
/// nats-server itself on a loopback port and stops it by its process id.
struct NATSBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nats",
        abstract: "Herald's broker beside NATS JetStream: acked publish, consume + ack, latency; prints the ratios.")

    @Option(help: "Events for the throughput runs.") var events = 100_000
    @Option(help: "Bytes of data per event.") var size = 100
    @Option(help: "Concurrent publishers.") var publishers = 16
    @Option(help: "Events per publish call.") var batch = 64
    @Option(help: "Events per second for the latency run.") var rate = 2000
    @Option(help: "Seconds of the latency run.") var seconds = 5
    @Option(help: "The nats-server executable (default: HERALD_NATS_SERVER, else nats-server on the PATH).")
    var natsServer: String?

    struct Result {
        var publish = 0.0
        var consume = 0.0
        var p50 = 0.0
        var p99 = 0.0
    }

    func run() async throws {
        let workload = TransportWorkload(
            events: events, size: size, publishers: publishers, batch: batch, rate: rate, seconds: seconds)
        print(
            "herald bench nats — \(events) events of \(size) bytes, \(publishers) publishers × \(batch) per call, "
                + "latency at \(rate)/s for \(seconds) s; one partition / one subject; everything on this machine")
        var logger = Logger(label: "herald.bench")
        logger.logLevel = .error

        // Herald: the embedded broker, fsync before ack, over loopback TCP.
        let directory = NSTemporaryDirectory() + "herald-bench-nats-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let engine = try Broker(
            configuration: BrokerConfiguration(dataDirectory: directory + "/herald", fsync: .always), logger: logger)
        let server = BrokerServer(broker: engine, port: 0, logger: logger)
        let port = try await server.start()
        let ticker = Task { try? await engine.run() }
        let herald = BrokerTransport(host: "127.0.0.1", port: port, clientName: "bench")
        _ = try await herald.admin(
            "topics.create",
            arguments: Array(try JSONSerialization.data(withJSONObject: ["name": "bench", "partitions": 1])))
        let heraldResult = try await measure(workload, herald, label: "Herald broker (fsync always)")
        await herald.shutdown()
        ticker.cancel()
        await server.stop()
        engine.close()

        var results: [(String, Result)] = [("Herald broker, fsync before ack", heraldResult)]
        for syncAlways in [false, true] {
            let label = syncAlways ? "JetStream, sync_interval: always" : "JetStream, default sync"
            let nats = try NATSProcess(
                executable: natsServer ?? ProcessInfo.processInfo.environment["HERALD_NATS_SERVER"] ?? "nats-server",
                directory: directory + (syncAlways ? "/nats-always" : "/nats-default"), syncAlways: syncAlways)
            try await nats.start()
            let transport = NATSTransport(
                configuration: .init(
                    servers: [.init(host: "127.0.0.1", port: nats.port)], partitions: 1, clientName: "bench"),
                logger: logger)
            do {
                results.append((label, try await measure(workload, transport, label: label)))
            } catch {
                await transport.shutdown()
                nats.stop()
                throw error
            }
            await transport.shutdown()
            nats.stop()
        }

        print("")
        print(pad("", 34) + pad("acked publish", 18) + pad("consume + ack", 18) + "latency p50 / p99")
        for (label, result) in results {
            print(
                pad(label, 34) + pad("\(Int(result.publish)) /s", 18) + pad("\(Int(result.consume)) /s", 18)
                    + "\(format(result.p50 / 1000, 3)) / \(format(result.p99 / 1000, 3)) ms")
        }
        print("")
        for (label, result) in results.dropFirst() {
            print(
                "Herald ÷ \(label): publish \(format(heraldResult.publish / result.publish, 2))× (goal ≥ 2.5×), "
                    + "consume + ack \(format(heraldResult.consume / result.consume, 2))× (goal ≥ 2×), "
                    + "p99 \(format(heraldResult.p99 / 1000, 3)) vs \(format(result.p99 / 1000, 3)) ms (goal: lower)")
        }
    }

    func measure(_ workload: TransportWorkload, _ transport: any EventTransport, label: String) async throws -> Result {
        var result = Result()
        let topic = "bench"
        result.publish = try await workload.measurePublish(transport, topic: topic)
        result.consume = try await workload.measureConsume(
            transport, topic: topic, group: "bench-each", count: events, batched: false)
        let (p50, p99, _, _) = try await workload.measureLatency(transport, topic: topic + "-latency")
        result.p50 = p50
        result.p99 = p99
        print("  \(label): measured")
        return result
    }
}

/// A nats-server with JetStream started by the benchmark (loopback, a port it picks and writes to a ports file, a
/// fresh store), stopped by its pid.
final class NATSProcess: @unchecked Sendable {
    // Safe: `port` is written once by start() before anyone reads it.
    var port = 0
    let process: Process
    let directory: String

    init(executable: String, directory: String, syncAlways: Bool) throws {
        self.directory = directory
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let config = """
            listen: "127.0.0.1:-1"
            ports_file_dir: "\(directory)"
            jetstream { store_dir: "\(directory)/store" \(syncAlways ? ", sync_interval: always" : "") }
            """
        try config.write(toFile: directory + "/nats.conf", atomically: true, encoding: .utf8)
        process = Process()
        process.executableURL = URL(fileURLWithPath: executable.contains("/") ? executable : Self.which(executable))
        process.arguments = ["-c", directory + "/nats.conf"]
        process.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
        process.standardError = FileHandle(forWritingAtPath: "/dev/null")
    }

    static func which(_ name: String) -> String {
        for directory in (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":") {
            let candidate = "\(directory)/\(name)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return name
    }

    func start() async throws {
        try process.run()
        for _ in 0..<200 {
            try await Task.sleep(for: .milliseconds(25))
            let files = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
            guard let file = files.first(where: { $0.hasSuffix(".ports") }),
                let data = FileManager.default.contents(atPath: directory + "/" + file),
                let ports = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
                let url = (ports["nats"] as? [String])?.first,
                let port = url.split(separator: ":").last.flatMap({ Int($0) })
            else { continue }
            self.port = port
            return
        }
        throw ValidationError("nats-server did not start (no ports file in \(directory))")
    }

    func stop() {
        guard process.isRunning else { return }
        kill(process.processIdentifier, SIGTERM)
        process.waitUntilExit()
    }
}
