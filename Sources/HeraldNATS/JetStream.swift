import Foundation

/// The JetStream API over a `NATSConnection`: streams and durable pull consumers (`$JS.API.…` requests with
/// JSON bodies), publishing with a `PubAck` and `Nats-Msg-Id` deduplication, batched fetches, and the ack
/// protocol (`+ACK`, `-NAK` with a delay, `+TERM`, `+WPI`).
public struct JetStream: Sendable {
    public let connection: NATSConnection
    public var apiTimeout: Duration

    public init(connection: NATSConnection, apiTimeout: Duration = .seconds(5)) {
        self.connection = connection
        self.apiTimeout = apiTimeout
    }

    public struct APIError: Error, Hashable, Sendable, CustomStringConvertible {
        public let code: Int
        public let errorCode: Int
        public let message: String
        public var description: String { "JetStream error \(code)/\(errorCode): \(message)" }

        /// Worth asking again shortly: the system is unavailable (503, e.g. no leader yet) or a new stream finds
        /// no peers yet (10005: a cluster still forming, or a node just lost).
        public var isTransient: Bool { code == 503 || errorCode == 10005 }
    }

    /// A request to the API; an `{"error": …}` answer throws `APIError`.
    func api(_ subject: String, _ body: [String: Any]) async throws -> [String: Any] {
        let payload = body.isEmpty ? [] : Array(try JSONSerialization.data(withJSONObject: body))
        let reply = try await connection.request("$JS.API." + subject, payload: payload, timeout: apiTimeout)
        let answer = (try? JSONSerialization.jsonObject(with: Data(reply.payload)) as? [String: Any]) ?? [:]
        if let error = answer["error"] as? [String: Any] {
            throw APIError(
                code: error["code"] as? Int ?? 0, errorCode: error["err_code"] as? Int ?? 0,
                message: error["description"] as? String ?? "unknown")
        }
        return answer
    }

    // MARK: Streams

    public struct StreamConfig: Sendable {
        public var name: String
        public var subjects: [String]
        public var replicas: Int
        public var duplicateWindow: Duration
        public var maxAge: Duration?

        public init(
            name: String, subjects: [String], replicas: Int = 1, duplicateWindow: Duration = .seconds(120),
            maxAge: Duration? = nil
        ) {
            self.name = name
            self.subjects = subjects
            self.replicas = replicas
            self.duplicateWindow = duplicateWindow
            self.maxAge = maxAge
        }
    }

    /// Creates the stream, or leaves an existing one with the same name as it is.
    public func ensureStream(_ config: StreamConfig) async throws {
        var body: [String: Any] = [
            "name": config.name, "subjects": config.subjects, "storage": "file", "retention": "limits",
            "num_replicas": config.replicas, "duplicate_window": config.duplicateWindow.nanoseconds,
            "discard": "old",
        ]
        if let maxAge = config.maxAge { body["max_age"] = maxAge.nanoseconds }
        do {
            _ = try await api("STREAM.CREATE.\(config.name)", body)
        } catch let error as APIError where error.errorCode == 10058 {
            // "stream name already in use with a different configuration": it exists; keep it.
        }
    }

    public func deleteStream(_ name: String) async throws {
        _ = try await api("STREAM.DELETE.\(name)", [:])
    }

    // MARK: Consumers

    public struct ConsumerConfig: Sendable {
        public var durable: String
        public var filterSubject: String?
        public var ackWait: Duration
        public var maxAckPending: Int
        /// `all` or `new`.
        public var deliverAll: Bool
        /// JetStream's `backoff`: how long delivery N may stay unacknowledged before it is redelivered (the last
        /// entry repeats); it replaces `ackWait` when set.
        public var backoff: [Duration]

        public init(
            durable: String, filterSubject: String? = nil, ackWait: Duration, maxAckPending: Int,
            deliverAll: Bool = true, backoff: [Duration] = []
        ) {
            self.durable = durable
            self.filterSubject = filterSubject
            self.ackWait = ackWait
            self.maxAckPending = maxAckPending
            self.deliverAll = deliverAll
            self.backoff = backoff
        }
    }

    /// `max_deliver` when a consumer has a backoff list (JetStream wants it finite and longer than the list): so
    /// many deliveries that the transport's own limit always comes first.
    static let unlimitedDeliveries = 1_000_000_000

    /// Creates the durable pull consumer, or updates the settings of an existing one. Deliveries are not limited
    /// by the server (`max_deliver` -1, or a billion with a backoff list): the transport counts attempts and
    /// dead-letters (Herald's semantics).
    public func ensureConsumer(stream: String, _ config: ConsumerConfig) async throws {
        var settings: [String: Any] = [
            "durable_name": config.durable, "ack_policy": "explicit", "ack_wait": config.ackWait.nanoseconds,
            "max_deliver": -1, "max_ack_pending": config.maxAckPending,
            "deliver_policy": config.deliverAll ? "all" : "new", "replay_policy": "instant",
        ]
        if let filter = config.filterSubject { settings["filter_subject"] = filter }
        if !config.backoff.isEmpty {
            settings["backoff"] = config.backoff.map(\.nanoseconds)
            settings["ack_wait"] = config.backoff[0].nanoseconds
            settings["max_deliver"] = Self.unlimitedDeliveries
        }
        _ = try await api(
            "CONSUMER.CREATE.\(stream).\(config.durable)", ["stream_name": stream, "config": settings])
    }

    // MARK: Publishing

    public struct PubAck: Sendable, Hashable {
        public let stream: String
        public let sequence: UInt64
        public let duplicate: Bool
    }

    /// Publishes and waits for the stream's acknowledgement. `messageID` (`Nats-Msg-Id`) makes a republish
    /// within the stream's duplicate window return the original sequence, flagged duplicate.
    public func publish(_ subject: String, headers: NATSHeaders, payload: [UInt8], messageID: String?) async throws
        -> PubAck
    {
        var headers = headers
        if let messageID { headers.fields.append(("Nats-Msg-Id", messageID)) }
        return try Self.pubAck(
            try await connection.request(subject, headers: headers, payload: payload, timeout: apiTimeout))
    }

    /// Publishes many messages in one write and waits for every acknowledgement (in order). A failure of any
    /// one throws; retrying the whole batch is safe with message ids (duplicates are acknowledged as such).
    public func publish(_ messages: [(subject: String, headers: NATSHeaders, payload: [UInt8], messageID: String?)])
        async throws -> [PubAck]
    {
        let replies = try await connection.requests(
            messages.map { message in
                var headers = message.headers
                if let id = message.messageID { headers.fields.append(("Nats-Msg-Id", id)) }
                return (message.subject, headers, message.payload)
            }, timeout: apiTimeout)
        return try replies.map { result in try Self.pubAck(try result.get()) }
    }

    static func pubAck(_ reply: NATSMessage) throws -> PubAck {
        let answer = (try? JSONSerialization.jsonObject(with: Data(reply.payload)) as? [String: Any]) ?? [:]
        if let error = answer["error"] as? [String: Any] {
            throw APIError(
                code: error["code"] as? Int ?? 0, errorCode: error["err_code"] as? Int ?? 0,
                message: error["description"] as? String ?? "unknown")
        }
        guard let stream = answer["stream"] as? String, let sequence = (answer["seq"] as? NSNumber)?.uint64Value else {
            throw NATSError(.protocolError, "not a PubAck: \(String(decoding: reply.payload, as: UTF8.self))")
        }
        return PubAck(stream: stream, sequence: sequence, duplicate: answer["duplicate"] as? Bool ?? false)
    }

    // MARK: Fetching and acknowledging

    /// Asks the consumer for up to `batch` messages, delivered to `inbox` (a subscription of the caller); the
    /// server ends the request with a `408` status after `expires` (or sends `404` when `noWait` and empty).
    public func pull(stream: String, consumer: String, inbox: String, batch: Int, expires: Duration) async throws {
        let body: [String: Any] = ["batch": batch, "expires": expires.nanoseconds]
        try await connection.publish(
            "$JS.API.CONSUMER.MSG.NEXT.\(stream).\(consumer)", replyTo: inbox,
            payload: Array(try JSONSerialization.data(withJSONObject: body)))
    }

    /// Where a JetStream message came from, parsed from its ack subject (`$JS.ACK.<stream>.<consumer>.
    /// <delivered>.<stream seq>.<consumer seq>.<time>.<pending>`, or the v2 form with domain and account hash).
    public struct MessageInfo: Sendable, Hashable {
        public let stream: String
        public let consumer: String
        public let delivered: Int
        public let streamSequence: UInt64

        public init?(ackSubject: String) {
            let tokens = ackSubject.split(separator: ".", omittingEmptySubsequences: false)
            guard tokens.count >= 9, tokens[0] == "$JS", tokens[1] == "ACK" else { return nil }
            let base = tokens.count == 9 ? 2 : 4
            guard tokens.count > base + 3, let delivered = Int(tokens[base + 2]),
                let sequence = UInt64(tokens[base + 3])
            else { return nil }
            stream = String(tokens[base])
            consumer = String(tokens[base + 1])
            self.delivered = delivered
            streamSequence = sequence
        }
    }

    public enum Acknowledgement: Sendable, Hashable {
        case ack
        case nak(delay: Duration)
        case term(reason: String)
        case inProgress

        var payload: [UInt8] {
            switch self {
            case .ack: Array("+ACK".utf8)
            case .nak(let delay):
                // Always with a delay (1 ns for "now"): a plain -NAK may be redelivered on the consumer's backoff.
                Array("-NAK {\"delay\":\(max(1, delay.nanoseconds))}".utf8)
            case .term(let reason): Array("+TERM \(reason.prefix(200))".utf8)
            case .inProgress: Array("+WPI".utf8)
            }
        }
    }

    /// Acknowledges a message; waits for the server to confirm (a request on the ack subject).
    public func acknowledge(_ ackSubject: String, _ acknowledgement: Acknowledgement) async throws {
        _ = try await connection.request(ackSubject, payload: acknowledgement.payload, timeout: apiTimeout)
    }

    /// Acknowledges many messages the same way in one write; waits until the server has confirmed each. Throws
    /// the first failure (the others may have been applied: acknowledgements are idempotent).
    public func acknowledge(_ ackSubjects: [String], _ acknowledgement: Acknowledgement) async throws {
        guard !ackSubjects.isEmpty else { return }
        let payload = acknowledgement.payload
        for reply in try await connection.requests(ackSubjects.map { ($0, nil, payload) }, timeout: apiTimeout) {
            _ = try reply.get()
        }
    }
}

extension Duration {
    var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }
}
