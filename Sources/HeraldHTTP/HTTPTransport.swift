import Foundation
import HTTPTypes
import Herald
import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import NIOSSL
import Synchronization

/// An `EventTransport` that speaks only the broker's public HTTP API, as a service written in any language
/// would: it publishes with `POST /v1/topics/{topic}/events` (CloudEvents batch mode) and receives through a push
/// group (`PUT .../groups/{group}` with `push.url`) whose POSTs land on a small HTTP receiver of its own.
///
/// Settling a pushed delivery answers its POST: ack → 204; nack → 503 (the broker redelivers with the group's
/// backoff); terminate → 422 with `herald-settlement: terminate` (the broker dead-letters it at once with the
/// reason in the body). A delivery not settled within the broker's push timeout is redelivered.
public final class HTTPTransport: EventTransport {
    public struct Configuration: Sendable {
        /// The broker's HTTP API, e.g. `http://127.0.0.1:7480`.
        public var broker: String
        public var token: String?
        /// For an `https` broker.
        public var tls: TLSConfiguration?
        /// Where the push receiver listens, and the host the broker should call it on.
        public var receiverHost: String
        public var receiverPort: Int

        public init(
            broker: String, token: String? = nil, tls: TLSConfiguration? = nil, receiverHost: String = "127.0.0.1",
            receiverPort: Int = 0
        ) {
            self.broker = broker
            self.token = token
            self.tls = tls
            self.receiverHost = receiverHost
            self.receiverPort = receiverPort
        }
    }

    public let configuration: Configuration
    let client: HTTPClient
    let logger: Logger
    /// push path (`/push/<topic>/<group>`) → the subscription's buffer.
    let subscriptions = Mutex<[String: DeliveryBuffer]>([:])
    /// push path → the group's ack wait: a settlement after it is stale (the broker has moved on).
    let ackWaits = Mutex<[String: Duration]>([:])
    /// (push path, source, id) → the newest attempt received: settling an older one is stale.
    let attempts = Mutex<[String: LatestAttempt]>([:])
    struct Receiver {
        var started = false
        var task: Task<Void, Never>?
        var port: Int?
        var waiters: [CheckedContinuation<Int, Never>] = []
    }
    let receiver = Mutex(Receiver())

    public init(configuration: Configuration, logger: Logger = Logger(label: "herald.http-transport")) {
        self.configuration = configuration
        self.client = HTTPClient(tls: configuration.tls)
        self.logger = logger
    }

    public var capabilities: TransportCapabilities {
        [.orderingPerKey, .deduplication, .delayedRedelivery, .deadLetters, .durable]
    }

    var authorization: [(name: String, value: String)] {
        configuration.token.map { [("authorization", "Bearer \($0)")] } ?? []
    }

    // MARK: Publishing

    public func publish(_ events: [CloudEvent], to topic: String) async throws -> [PublishAck] {
        guard !events.isEmpty else { return [] }
        let body: [UInt8]
        do {
            body = try CloudEventJSON.encodeBatch(events)
        } catch {
            throw TransportError(.invalidRequest, "an event is invalid: \(error.message)")
        }
        let response = try await call(
            "POST", "/v1/topics/\(topic)/events", contentType: CloudEventJSON.batchContentType, body: body)
        struct Results: Decodable {
            struct Result: Decodable {
                var id: String
                var partition: Int
                var offset: Int64
                var duplicate: Bool
            }
            var results: [Result]
        }
        let results = try JSONDecoder().decode(Results.self, from: Data(response.body)).results
        return results.map {
            PublishAck(id: EventID($0.id), partition: $0.partition, offset: $0.offset, duplicate: $0.duplicate)
        }
    }

    /// A request to the broker; problems become `TransportError`s (503 → unavailable, 4xx → invalidRequest).
    func call(_ method: String, _ path: String, contentType: String = "application/json", body: [UInt8]) async throws
        -> HTTPClient.Response
    {
        let response: HTTPClient.Response
        do {
            response = try await client.request(
                method, configuration.broker + path, headers: authorization + [("content-type", contentType)],
                body: body, timeout: .seconds(30))
        } catch {
            throw TransportError(.unavailable, "the broker's HTTP API cannot be reached: \(error)")
        }
        guard (200..<300).contains(response.status) else {
            let detail = String(decoding: response.body, as: UTF8.self)
            throw TransportError(
                response.status >= 500 ? .unavailable : .invalidRequest,
                "\(method) \(path) answered \(response.status): \(detail)")
        }
        return response
    }

    // MARK: Subscribing

    public func subscribe(topic: String, group: String, options: SubscribeOptions) async throws -> DeliveryStream {
        let port = try await receiverPort()
        let path = "/push/\(topic)/\(group)"
        let (stream, buffer) = DeliveryStream.make { [weak self] in
            _ = self?.subscriptions.withLock { $0.removeValue(forKey: path) }
        }
        subscriptions.withLock { $0[path] = buffer }
        ackWaits.withLock { $0[path] = options.ackWait }
        let settings: [String: Any] = [
            "start": options.start == .earliest ? "earliest" : "latest",
            "ackWaitMs": max(1, options.ackWait.milliseconds), "maxDeliver": options.maxDeliveries,
            "backoffMs": options.backoff.map(\.milliseconds), "ordered": options.ordered,
            "push": ["url": "http://\(configuration.receiverHost):\(port)\(path)"],
        ]
        _ = try await call(
            "PUT", "/v1/topics/\(topic)/groups/\(group)",
            body: Array(try JSONSerialization.data(withJSONObject: settings)))
        return stream
    }

    public func shutdown() async {
        let (task, buffers) = (
            receiver.withLock { $0.task },
            subscriptions.withLock { subscriptions in
                defer { subscriptions = [:] }
                return Array(subscriptions.values)
            }
        )
        for buffer in buffers { buffer.finish() }
        task?.cancel()
        client.shutdown()
    }

    /// Starts the push receiver once; returns its port.
    func receiverPort() async throws -> Int {
        await withCheckedContinuation { continuation in
            let (port, start) = receiver.withLock { state -> (Int?, Bool) in
                if let port = state.port { return (port, false) }
                state.waiters.append(continuation)
                defer { state.started = true }
                return (nil, !state.started)
            }
            if let port { return continuation.resume(returning: port) }
            if start { startReceiver() }
        }
    }

    private func startReceiver() {
        let router = Router()
        router.post("/push/{topic}/{group}") { request, context -> Response in
            let path = "/push/\(context.parameters.get("topic") ?? "")/\(context.parameters.get("group") ?? "")"
            guard let buffer = self.subscriptions.withLock({ $0[path] }) else { return Response(status: .gone) }
            var body = try await request.body.collect(upTo: 16 << 20)
            let event: CloudEvent
            do {
                event = try CloudEventHTTPBinding.decodeBinary(
                    headers: request.headers.map { (name: $0.name.canonicalName, value: $0.value) },
                    body: body.readBytes(length: body.readableBytes) ?? [])
            } catch {
                return Self.terminate("the pushed event is not a valid CloudEvent: \(error)")
            }
            let attempt = request.headers[HTTPField.Name("herald-delivery-attempt")!].flatMap { Int($0) } ?? 1
            let key = "\(path)\u{0}\(event.source)\u{0}\(event.id)"
            let current = self.attempts.withLock { attempts -> LatestAttempt in
                if let latest = attempts[key] {
                    latest.attempt.max(attempt)
                    return latest
                }
                if attempts.count > 100_000 { attempts.removeAll() }
                let latest = LatestAttempt(attempt: attempt)
                attempts[key] = latest
                return latest
            }
            let deadline = ContinuousClock.now + (self.ackWaits.withLock { $0[path] } ?? .seconds(30))
            let settlement: Settlement = await withCheckedContinuation { continuation in
                let settler = PushSettler(
                    continuation: continuation, attempt: attempt, latest: current, deadline: deadline)
                let delivery = Delivery(event: event, attempt: attempt, partition: 0, offset: 0, settler: settler)
                if !buffer.push(CollectionOfOne(delivery)) { settler.answer(.nack(.zero)) }
            }
            switch settlement {
            case .ack: return Response(status: .noContent)
            case .nack(let delay):
                return Response(
                    status: .serviceUnavailable,
                    headers: [HTTPField.Name("herald-retry-after-ms")!: String(max(0, delay.milliseconds))])
            case .terminate(let reason): return Self.terminate(reason)
            }
        }
        let app = Application(
            router: router,
            configuration: ApplicationConfiguration(
                address: .hostname(configuration.receiverHost, port: configuration.receiverPort),
                serverName: "herald-push-receiver"),
            onServerRunning: { channel in
                let port = channel.localAddress?.port ?? 0
                let waiters = self.receiver.withLock { state in
                    state.port = port
                    defer { state.waiters = [] }
                    return state.waiters
                }
                for waiter in waiters { waiter.resume(returning: port) }
            }, logger: logger)
        let task = Task {
            do {
                try await app.run()
            } catch {
                self.logger.error("the push receiver stopped", metadata: ["error": "\(error)"])
            }
        }
        receiver.withLock { $0.task = task }
    }

    static func terminate(_ reason: String) -> Response {
        Response(
            status: .unprocessableContent, headers: [HTTPField.Name("herald-settlement")!: "terminate"],
            body: ResponseBody(byteBuffer: ByteBuffer(string: reason)))
    }
}

/// The newest attempt of one event this receiver has seen.
final class LatestAttempt: Sendable {
    let attempt: Atomic<Int>
    init(attempt: Int) { self.attempt = Atomic(attempt) }
}

extension Atomic<Int> {
    func max(_ value: Int) {
        var current = load(ordering: .relaxed)
        while current < value {
            let (exchanged, original) = compareExchange(
                expected: current, desired: value, ordering: .relaxed)
            if exchanged { return }
            current = original
        }
    }
}

/// Settles one pushed delivery by answering its POST. A settlement is stale (and answered as a nack, which the
/// broker ignores) once a newer attempt of the event arrived or the group's ack wait passed.
final class PushSettler: DeliverySettler {
    let continuation: Mutex<CheckedContinuation<Settlement, Never>?>
    let attempt: Int
    let latest: LatestAttempt
    let deadline: ContinuousClock.Instant

    init(
        continuation: CheckedContinuation<Settlement, Never>, attempt: Int, latest: LatestAttempt,
        deadline: ContinuousClock.Instant
    ) {
        self.continuation = Mutex(continuation)
        self.attempt = attempt
        self.latest = latest
        self.deadline = deadline
    }

    /// A delivery dropped unsettled (its consumer went away) answers its POST with a nack, so the broker
    /// redelivers it at once instead of waiting for the push timeout.
    deinit {
        answer(.nack(.zero))
    }

    /// Answers the POST once; false when it was already answered.
    @discardableResult
    func answer(_ settlement: Settlement) -> Bool {
        let taken = continuation.withLock { state in
            defer { state = nil }
            return state
        }
        taken?.resume(returning: settlement)
        return taken != nil
    }

    func settle(_ delivery: Delivery, _ settlement: Settlement) async throws {
        guard
            let continuation = continuation.withLock({ state in
                defer { state = nil }
                return state
            })
        else {
            throw TransportError(.staleAck, "this delivery was already settled")
        }
        guard latest.attempt.load(ordering: .relaxed) == attempt, ContinuousClock.now < deadline else {
            continuation.resume(returning: .nack(.zero))
            throw TransportError(.staleAck, "attempt \(attempt) was superseded (ack wait passed or redelivered)")
        }
        continuation.resume(returning: settlement)
    }
}
