import Foundation
import Herald
import HeraldWire
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import Synchronization

/// A small HTTP/1.1 client on SwiftNIO with keep-alive connections per host and optional TLS: enough for push
/// deliveries and for services that talk to the broker only over HTTP. One request at a time per connection;
/// concurrent requests open more connections (kept up to `maxIdlePerHost`).
public final class HTTPClient: Sendable {
    public struct Response: Sendable {
        public var status: Int
        public var headers: [(name: String, value: String)]
        public var body: [UInt8]

        public func header(_ name: String) -> String? {
            headers.first { $0.name.lowercased() == name.lowercased() }?.value
        }
    }

    public struct Failure: Error, Sendable, CustomStringConvertible {
        public let message: String
        public var description: String { "HTTPClient: \(message)" }
    }

    let group: any EventLoopGroup
    let tls: NIOSSLContext?
    let maxIdlePerHost: Int
    private let idle = Mutex<[String: [any Channel]]>([:])

    /// - Parameter tls: for `https` URLs (default: the system's trust roots).
    public init(
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton, tls: TLSConfiguration? = nil,
        maxIdlePerHost: Int = 16
    ) {
        self.group = group
        self.tls = try? NIOSSLContext(configuration: tls ?? .makeClientConfiguration())
        self.maxIdlePerHost = maxIdlePerHost
    }

    /// Sends one request and reads the whole response.
    public func request(
        _ method: String, _ url: String, headers: [(name: String, value: String)] = [], body: [UInt8] = [],
        timeout: Duration = .seconds(10)
    ) async throws -> Response {
        guard let components = URLComponents(string: url), let host = components.host,
            let scheme = components.scheme, scheme == "http" || scheme == "https"
        else { throw Failure(message: "not an http(s) URL: \(url)") }
        let port = components.port ?? (scheme == "https" ? 443 : 80)
        let key = "\(scheme)://\(host):\(port)"
        var target = components.percentEncodedPath.isEmpty ? "/" : components.percentEncodedPath
        if let query = components.percentEncodedQuery { target += "?" + query }
        var head = HTTPRequestHead(version: .http1_1, method: HTTPMethod(rawValue: method), uri: target)
        head.headers.add(name: "host", value: components.port.map { "\(host):\($0)" } ?? host)
        head.headers.add(name: "content-length", value: String(body.count))
        for (name, value) in headers { head.headers.add(name: name, value: value) }
        let request = head
        let channel = try await connection(key: key, host: host, port: port, tls: scheme == "https")
        let collector = try await channel.pipeline.handler(type: ResponseCollector.self).get()
        let promise = channel.eventLoop.makePromise(of: Response.self)
        let timer = channel.eventLoop.scheduleTask(in: .nanoseconds(Int64(timeout.nanoseconds))) {
            promise.fail(Failure(message: "no response from \(url) within \(timeout)"))
            channel.close(promise: nil)
        }
        channel.eventLoop.execute {
            collector.start(promise)
            channel.write(HTTPClientRequestPart.head(request), promise: nil)
            if !body.isEmpty {
                channel.write(HTTPClientRequestPart.body(.byteBuffer(ByteBuffer(bytes: body))), promise: nil)
            }
            // A write that fails (the connection or its TLS handshake failed) fails the request at once.
            channel.writeAndFlush(HTTPClientRequestPart.end(nil)).whenFailure { error in
                promise.fail(Failure(message: "cannot send to \(url): \(error)"))
            }
            if !channel.isActive { promise.fail(Failure(message: "the connection to \(url) closed")) }
        }
        let response: Response
        do {
            response = try await promise.futureResult.get()
        } catch {
            timer.cancel()
            channel.close(promise: nil)
            throw error
        }
        timer.cancel()
        if response.header("connection")?.lowercased() == "close" || !channel.isActive {
            channel.close(promise: nil)
        } else {
            let kept = idle.withLock { idle -> Bool in
                guard idle[key, default: []].count < maxIdlePerHost else { return false }
                idle[key, default: []].append(channel)
                return true
            }
            if !kept { channel.close(promise: nil) }
        }
        return response
    }

    /// Closes idle connections.
    public func shutdown() {
        let channels = idle.withLock { idle in
            defer { idle = [:] }
            return idle.values.flatMap { $0 }
        }
        for channel in channels { channel.close(promise: nil) }
    }

    private func connection(key: String, host: String, port: Int, tls useTLS: Bool) async throws -> any Channel {
        while let channel = idle.withLock({ $0[key]?.popLast() }) {
            if channel.isActive { return channel }
        }
        if useTLS && tls == nil { throw Failure(message: "TLS is not available") }
        let tls = useTLS ? self.tls : nil
        let bootstrap = ClientBootstrap(group: group)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(.seconds(5))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        try channel.pipeline.syncOperations.addHandler(
                            try NIOSSLClientHandler(context: tls, serverHostname: host.isIPAddress ? nil : host))
                    }
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(ResponseCollector())
                }
            }
        do {
            return try await bootstrap.connect(host: host, port: port).get()
        } catch {
            throw Failure(message: "cannot connect to \(host):\(port): \(error)")
        }
    }
}

/// Collects one response at a time into the promise `start` gave it.
final class ResponseCollector: ChannelInboundHandler, @unchecked Sendable {
    // Touched only on the channel's event loop.
    typealias InboundIn = HTTPClientResponsePart

    var promise: EventLoopPromise<HTTPClient.Response>?
    var response = HTTPClient.Response(status: 0, headers: [], body: [])

    func start(_ promise: EventLoopPromise<HTTPClient.Response>) {
        self.promise = promise
        response = HTTPClient.Response(status: 0, headers: [], body: [])
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            response.status = Int(head.status.code)
            response.headers = head.headers.map { ($0.name, $0.value) }
        case .body(var buffer):
            if let bytes = buffer.readBytes(length: buffer.readableBytes) { response.body += bytes }
        case .end:
            let promise = self.promise
            self.promise = nil
            promise?.succeed(response)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        fail(HTTPClient.Failure(message: "\(error)"))
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        fail(HTTPClient.Failure(message: "the connection closed before the response"))
        context.fireChannelInactive()
    }

    private func fail(_ error: any Error) {
        let promise = self.promise
        self.promise = nil
        promise?.fail(error)
    }
}
