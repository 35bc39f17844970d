import Foundation
import HTTPTypes
import Herald
import HeraldAuth
import HeraldBroker
import HeraldWire
import Hummingbird
import HummingbirdCore
import HummingbirdTLS
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import ServiceLifecycle
import Synchronization

/// Limits of the HTTP API, with their defaults (docs/http.md lists them).
public struct HTTPLimits: Sendable {
    /// Largest request body; larger bodies get 413 before they are read (by Content-Length) or as soon as the
    /// body passes it (chunked).
    public var maxBodyBytes = 4 << 20
    /// Largest request head (request line and headers); larger heads get 431.
    public var maxHeaderBytes = 16 << 10
    /// A request must arrive whole within this time, or the connection is closed (slow clients, slowloris).
    public var requestTimeout: Duration = .seconds(30)
    /// An idle keep-alive connection is closed after this time.
    public var idleTimeout: Duration = .seconds(60)
    /// Concurrent connections; more wait in the accept backlog.
    public var maxConnections = 1024
    /// Longest long-poll wait and most messages a pull may ask for.
    public var maxPullWait: Duration = .seconds(30)
    public var maxPullMessages = 1000
    /// Deliveries a Server-Sent Events stream holds unacknowledged at most (`?max=` may lower it).
    public var maxStreamInFlight = 1000

    public init() {}
}

/// The broker's HTTP and CloudEvents API (the route table is `APIRoute`; docs/openapi.yaml describes it).
///
/// It shares the engine with the TCP server: the same `Broker` does the validation, limits, dedup and
/// durability; the same `Authenticator` and permission checks guard every route but `/healthz`.
public final class HTTPServer: Service, Sendable {
    public let broker: Broker
    public let host: String
    public let port: Int
    let authenticator: Authenticator?
    let tls: TLSConfiguration?
    let limits: HTTPLimits
    let logger: Logger
    let metrics: BrokerMetrics
    let pullers = Pullers()
    let pushers: PushDispatcher
    private let bound = Mutex<(port: Int?, waiters: [CheckedContinuation<Int, Never>])>((nil, []))

    public init(
        broker: Broker, host: String = "127.0.0.1", port: Int = 7480, authenticator: Authenticator? = nil,
        tls: TLSConfiguration? = nil, limits: HTTPLimits = HTTPLimits(), metrics: BrokerMetrics = BrokerMetrics(),
        pushClient: HTTPClient = HTTPClient(), logger: Logger = Logger(label: "herald.http")
    ) {
        self.broker = broker
        self.host = host
        self.port = port
        self.authenticator = authenticator
        self.tls = tls
        self.limits = limits
        self.metrics = metrics
        self.logger = logger
        pushers = PushDispatcher(broker: broker, client: pushClient, metrics: metrics, logger: logger)
    }

    /// The port the server listens on, once it does (useful with port 0).
    public func boundPort() async -> Int {
        await withCheckedContinuation { continuation in
            let port = bound.withLock { state -> Int? in
                if let port = state.port { return port }
                state.waiters.append(continuation)
                return nil
            }
            if let port { continuation.resume(returning: port) }
        }
    }

    /// Serves until graceful shutdown or cancellation; push groups are served meanwhile.
    public func run() async throws {
        let router = Router(context: BasicRequestContext.self)
        router.middlewares.add(ProblemMiddleware())
        for route in APIRoute.allCases {
            router.on(RouterPath(route.path), method: route.method) { request, context in
                try await self.respond(route, request, context)
            }
        }
        let limits = self.limits
        let metrics = self.metrics
        let http1 = HTTPServerBuilder.http1(
            configuration: HTTP1Channel.Configuration(
                additionalChannelHandlers: [
                    RequestGuard(
                        maxBodyBytes: limits.maxBodyBytes, requestTimeout: limits.requestTimeout,
                        connections: metrics.httpConnections)
                ],
                idleTimeout: .nanoseconds(Int64(limits.idleTimeout.nanoseconds)),
                httpDecoderConfiguration: .init(
                    maxHeaderFieldSize: limits.maxHeaderBytes, maxHeaderListSize: limits.maxHeaderBytes)))
        let server = try tls.map { try HTTPServerBuilder.tls(http1, tlsConfiguration: $0) } ?? http1
        let app = Application(
            router: router, server: server,
            configuration: ApplicationConfiguration(
                address: .hostname(host, port: port), serverName: "herald",
                availableConnectionsDelegate: MaximumAvailableConnections(limits.maxConnections)),
            onServerRunning: { channel in
                let port = channel.localAddress?.port ?? 0
                let waiters = self.bound.withLock { state in
                    state.port = port
                    defer { state.waiters = [] }
                    return state.waiters
                }
                for waiter in waiters { waiter.resume(returning: port) }
            },
            logger: logger)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { await self.pushers.run() }
            group.addTask { try await app.run() }
            try await group.next()
            group.cancelAll()
        }
        pullers.close(broker: broker)
    }

    // MARK: Routing

    func respond(_ route: APIRoute, _ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let topic = context.parameters.get("topic")
        let group = context.parameters.get("group")
        let principal = try await authorize(route, request, topic: topic)
        switch route {
        case .publish: return try await publish(request, topic: topic!)
        case .listTopics: return try await admin("topics.list", [:], principal)
        case .putTopic: return try await putTopic(request, topic: topic!, principal)
        case .getTopic: return try await admin("topics.describe", ["name": topic!], principal)
        case .deleteTopic:
            _ = try await admin("topics.delete", ["name": topic!], principal)
            return Response(status: .noContent)
        case .putGroup: return try await putGroup(request, topic: topic!, group: group!)
        case .getGroup:
            guard let info = broker.group(topic: topic!, group: group!) else {
                throw BrokerError(.notFound, "no group '\(group!)' on topic '\(topic!)'")
            }
            return try json(info)
        case .deleteGroup:
            _ = try await admin("groups.delete", ["topic": topic!, "group": group!], principal)
            return Response(status: .noContent)
        case .pull: return try await pull(request, topic: topic!, group: group!)
        case .ack: return try await settle(request, topic: topic!, group: group!, nack: false)
        case .nack: return try await settle(request, topic: topic!, group: group!, nack: true)
        case .stream: return try await stream(request, topic: topic!, group: group!)
        case .listDeadLetters:
            let limit = request.uri.queryParameters.get("limit").flatMap { Int($0) } ?? 100
            let letters = try broker.deadLetters(topic: topic!, limit: min(max(1, limit), 10_000))
            return Response(
                status: .ok, headers: [.contentType: "application/cloudevents-batch+json"],
                body: ResponseBody(byteBuffer: ByteBuffer(bytes: try CloudEventJSON.encodeBatch(letters))))
        case .replayDeadLetters:
            let limit = request.uri.queryParameters.get("limit").flatMap { Int($0) } ?? 1000
            return try await admin("dlq.replay", ["topic": topic!, "limit": max(1, limit)], principal)
        case .health:
            return Response(
                status: .ok, headers: [.contentType: "application/json"],
                body: ResponseBody(byteBuffer: ByteBuffer(string: #"{"status":"ok"}"#)))
        case .metrics:
            return Response(
                status: .ok, headers: [.contentType: "text/plain; version=0.0.4"],
                body: ResponseBody(
                    byteBuffer: ByteBuffer(bytes: metrics.exposition(broker: broker, visible: principal))))
        }
    }

    /// Authenticates (when auth is on) and checks the route's permission for the topic in the path.
    func authorize(_ route: APIRoute, _ request: Request, topic: String?) async throws -> Principal {
        guard let authenticator else { return .anonymous }
        if route.requirement == .none { return .anonymous }
        let principal = try await authenticator.authenticate(authorization: request.headers[.authorization])
        switch route.requirement {
        case .none: break
        case .topic(let action): try principal.require(action, on: topic ?? "")
        case .any(let action): try principal.requireAny(action)
        }
        return principal
    }

    func admin(_ command: String, _ arguments: [String: any Sendable], _ principal: Principal) async throws
        -> Response
    {
        let body = try JSONSerialization.data(withJSONObject: arguments)
        let result = try await AdminCommand.run(command, arguments: Array(body), on: broker, as: principal)
        return Response(
            status: .ok, headers: [.contentType: "application/json"],
            body: ResponseBody(byteBuffer: ByteBuffer(bytes: result)))
    }

    func json(_ value: some Encodable, status: HTTPResponse.Status = .ok) throws -> Response {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return Response(
            status: status, headers: [.contentType: "application/json"],
            body: ResponseBody(byteBuffer: ByteBuffer(bytes: try encoder.encode(value))))
    }

    /// The body, refused with 413 when Content-Length says it is too large (before reading) or when it grows
    /// past the limit while being read.
    func body(_ request: Request, limit: Int? = nil) async throws -> [UInt8] {
        let limit = limit ?? limits.maxBodyBytes
        if let length = request.headers[.contentLength].flatMap({ Int($0) }), length > limit {
            throw Problem(
                .contentTooLarge, code: "too-large", title: "Body too large",
                detail: "the body has \(length) bytes; the limit is \(limit)")
        }
        var buffer = try await request.body.collect(upTo: limit)
        return buffer.readBytes(length: buffer.readableBytes) ?? []
    }

    func decodeJSON<T: Decodable>(_ type: T.Type, _ request: Request, empty: T) async throws -> T {
        let bytes = try await body(request, limit: 1 << 20)
        if bytes.isEmpty { return empty }
        do {
            return try JSONDecoder().decode(T.self, from: Data(bytes))
        } catch {
            throw Problem.invalid("the body is not the expected JSON: \(error)")
        }
    }
}
