import ArgumentParser
import Foundation
import HeraldBroker
import HeraldHTTP
import Hummingbird
import Logging
import NIOCore
import NIOPosix
import Synchronization

/// `herald bench http`: the HTTP API on an embedded broker (fsync before ack), beside a same-run baseline — a
/// Hummingbird route that only returns 200, driven by the same client with the same concurrency.
struct HTTPBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "http", abstract: "HTTP publish (single and batched) and SSE delivery against a 200-only baseline."
    )

    @Option(help: "Seconds per request-rate measurement.") var seconds = 5
    @Option(help: "Concurrent HTTP connections.") var connections = 32
    @Option(help: "Alternating baseline/publish rounds (medians are reported).") var rounds = 3
    @Option(help: "Events per batched publish.") var batch = 100
    @Option(help: "Events streamed for the SSE measurement.") var streamed = 50_000
    @Option(help: "Bytes of data per event.") var size = 100

    func run() async throws {
        let directory = NSTemporaryDirectory() + "herald-http-bench-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var logger = Logger(label: "herald.bench")
        logger.logLevel = .error
        let broker = try Broker(configuration: BrokerConfiguration(dataDirectory: directory), logger: logger)
        _ = try broker.createTopic("bench", partitions: 1)
        let server = HTTPServer(broker: broker, port: 0, logger: logger)
        let serverTask = Task { try? await server.run() }
        let ticker = Task { try? await broker.run() }
        let port = await server.boundPort()

        // The baseline: a route that only returns 200.
        let router = Router()
        router.post("/ok") { _, _ in Response(status: .ok) }
        let baselinePort = Mutex<CheckedContinuation<Int, Never>?>(nil)
        let baseline = Application(
            router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)),
            onServerRunning: { channel in
                baselinePort.withLock { $0?.resume(returning: channel.localAddress?.port ?? 0) }
            },
            logger: logger)
        var baselineTask: Task<Void, Never>?
        let okPort = await withCheckedContinuation { continuation in
            baselinePort.withLock { $0 = continuation }
            baselineTask = Task { try? await baseline.run() }
        }

        let data = String(repeating: "x", count: size)
        let client = HTTPClient(maxIdlePerHost: connections)
        print(
            "herald bench http: \(connections) connections, \(seconds) s per run, \(size)-byte events, fsync before ack"
        )
        // The baseline gets the very request a publish sends (same headers, same body) and answers 200 without
        // looking at it: the ratio is Herald's own cost (decode, validate, append, fsync, reply) against the HTTP
        // plumbing both share. Rounds alternate so drift on a noisy machine hits both sides alike; medians reported.
        let publishHeaders: [(name: String, value: String)] = [
            ("ce-specversion", "1.0"), ("ce-source", "/bench"), ("ce-type", "bench"), ("content-type", "text/plain"),
        ]
        var okRates: [Double] = []
        var singleRates: [Double] = []
        for _ in 0..<rounds {
            okRates.append(
                try await requests(
                    client, "http://127.0.0.1:\(okPort)/ok", headers: publishHeaders, body: { _ in Array(data.utf8) },
                    id: true))
            singleRates.append(
                try await requests(
                    client, "http://127.0.0.1:\(port)/v1/topics/bench/events", headers: publishHeaders,
                    body: { _ in Array(data.utf8) }, id: true))
        }
        let okRate = median(okRates)
        let single = median(singleRates)
        let ratios = zip(singleRates, okRates).map { $0 / $1 }
        print(
            "  baseline (Hummingbird route returning 200 to the same request)    \(Int(okRate)) requests/s"
                + " (median of \(rounds))")
        print(
            "  publish, one event per request (durable)      \(Int(single)) requests/s = "
                + "\(String(format: "%.2f", single / okRate))× baseline (rounds: "
                + ratios.map { String(format: "%.2f", $0) }.joined(separator: ", ") + ")")
        let empty = try await requests(client, "http://127.0.0.1:\(okPort)/ok", headers: [], body: { _ in [] })
        print("  for scale: an empty POST to the baseline route   \(Int(empty)) requests/s")
        let counter = Atomic<Int>(0)
        let batched = try await requests(
            client, "http://127.0.0.1:\(port)/v1/topics/bench/events",
            headers: [("content-type", "application/cloudevents-batch+json")],
            body: { _ in
                let base = counter.add(batch, ordering: .relaxed).newValue
                let events = (0..<batch).map {
                    #"{"specversion":"1.0","id":"b\#(base + $0)","source":"/bench","type":"bench","data":"\#(data)"}"#
                }
                return Array(("[" + events.joined(separator: ",") + "]").utf8)
            })
        print(
            "  publish, batches of \(batch) (durable)            \(Int(batched * Double(batch))) events/s (\(Int(batched)) requests/s)"
        )

        // SSE: a group from the start of the topic streams what the runs above stored (at least `streamed`).
        let stored = broker.topic("bench")?.endOffsets.reduce(0, +) ?? 0
        let target = Int(min(Int64(streamed), stored))
        let start = ContinuousClock.now
        let received = try await streamEvents(port: port, count: target)
        let elapsed = ContinuousClock.now - start
        let sseRate =
            Double(received) / (Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18)
        print("  SSE delivery (autoAck)                         \(Int(sseRate)) events/s (\(received) events)")

        client.shutdown()
        serverTask.cancel()
        baselineTask?.cancel()
        ticker.cancel()
        try? await Task.sleep(for: .milliseconds(100))
        broker.close()
    }

    /// Requests per second with `connections` concurrent loops for `seconds`.
    func requests(
        _ client: HTTPClient, _ url: String, headers: [(name: String, value: String)],
        body: @escaping @Sendable (Int) -> [UInt8], id: Bool = false
    ) async throws -> Double {
        let deadline = ContinuousClock.now + .seconds(seconds)
        let start = ContinuousClock.now
        let total = try await withThrowingTaskGroup(of: Int.self) { group in
            for worker in 0..<connections {
                group.addTask {
                    var count = 0
                    while ContinuousClock.now < deadline {
                        let extra: [(name: String, value: String)] = id ? [("ce-id", "w\(worker)-\(count)")] : []
                        let response = try await client.request(
                            "POST", url, headers: headers + extra, body: body(count))
                        guard response.status == 200 else {
                            throw ValidationError(
                                "\(url) answered \(response.status): \(String(decoding: response.body, as: UTF8.self))")
                        }
                        count += 1
                    }
                    return count
                }
            }
            return try await group.reduce(0, +)
        }
        let elapsed = ContinuousClock.now - start
        return Double(total) / (Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18)
    }

    /// Opens a stream and counts `event:` lines until `count` arrived.
    func streamEvents(port: Int, count: Int) async throws -> Int {
        final class Counter: ChannelInboundHandler, Sendable {
            typealias InboundIn = ByteBuffer
            let state = Mutex<(seen: Int, waiter: CheckedContinuation<Void, Never>?)>((0, nil))
            let target: Int
            init(target: Int) { self.target = target }

            func channelRead(context: ChannelHandlerContext, data: NIOAny) {
                var events = 0
                var previous: UInt8 = 0
                for byte in unwrapInboundIn(data).readableBytesView {
                    // An "event:" line: an 'e' right after a newline.
                    if previous == UInt8(ascii: "\n") && byte == UInt8(ascii: "e") { events += 1 }
                    previous = byte
                }
                let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
                    state.seen += events
                    guard state.seen >= target else { return nil }
                    defer { state.waiter = nil }
                    return state.waiter
                }
                waiter?.resume()
            }

            func wait() async {
                await withCheckedContinuation { continuation in
                    let reached = state.withLock { state -> Bool in
                        if state.seen >= target { return true }
                        state.waiter = continuation
                        return false
                    }
                    if reached { continuation.resume() }
                }
            }
        }
        let counter = Counter(target: count)
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(counter) }
            }
            .connect(host: "127.0.0.1", port: port).get()
        let request = "GET /v1/topics/bench/groups/sse/stream?autoAck=true HTTP/1.1\r\nhost: x\r\n\r\n"
        try await channel.writeAndFlush(ByteBuffer(string: request))
        await counter.wait()
        try? await channel.close()
        return counter.state.withLock { $0.seen }
    }
}
