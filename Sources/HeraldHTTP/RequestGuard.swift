import Foundation
import HTTPTypes
import Herald
import NIOCore
import NIOHTTP1
import NIOHTTPTypes
import NIOSSL

/// Per-connection limits that must hold before a handler runs, on the decoded request parts:
///
/// - a `Content-Length` above the body limit → 413 and close, before any of the body is read;
/// - both `Content-Length` and `Transfer-Encoding` (a request-smuggling shape) → 400 and close;
/// - a request head larger than the header limit (the decoder refuses it) → 431 and close; other malformed
///   requests → 400 and close;
/// - a request that does not arrive whole within the request timeout, counted from its first byte (a slow or
///   stalled client, a slowloris head sent a byte at a time) → the connection is closed.
///
/// The refusals are written as raw bytes below the HTTP codec (the request never reached the router), each an
/// `application/problem+json` body.
final class RequestGuard: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    let maxBodyBytes: Int
    let requestTimeout: Duration
    let connections: ConnectionGauge
    var timer: Scheduled<Void>?
    /// When the request being read began, while one is (head read, end not yet).
    var requestStarted: NIODeadline?
    var counted = false
    var refused = false

    init(maxBodyBytes: Int, requestTimeout: Duration, connections: ConnectionGauge) {
        self.maxBodyBytes = maxBodyBytes
        self.requestTimeout = requestTimeout
        self.connections = connections
    }

    func handlerAdded(context: ChannelHandlerContext) {
        counted = true
        connections.opened()
        // The HTTP decoder holds an incomplete head back, so the first byte of a request is seen in front of it
        // (behind TLS, whose handshake is not a request).
        let pipeline = context.pipeline.syncOperations
        let position: ChannelPipeline.SynchronousOperations.Position =
            (try? pipeline.handler(type: NIOSSLServerHandler.self)).map { .after($0) } ?? .first
        try? pipeline.addHandler(FirstByteWatcher(guard: self), position: position)
    }

    /// Bytes arrived: a request begins with its first byte (the clock runs until its end is decoded).
    func bytesArrived() {
        if requestStarted == nil { requestStarted = .now() }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        if counted {
            counted = false
            connections.closed()
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !refused else { return }
        switch unwrapInboundIn(data) {
        case .head(let head):
            if requestStarted == nil { requestStarted = .now() }
            let lengths = head.headerFields[values: .contentLength]
            if !lengths.isEmpty && head.headerFields[.transferEncoding] != nil {
                return refuse(
                    400, "Bad Request", code: "invalid-request",
                    "Content-Length and Transfer-Encoding must not both be present", context: context)
            }
            if lengths.contains(where: { $0 != lengths[0] }) {
                return refuse(
                    400, "Bad Request", code: "invalid-request", "conflicting Content-Length values", context: context)
            }
            if let length = lengths.first.flatMap({ Int($0) }), length > maxBodyBytes {
                return refuse(
                    413, "Content Too Large", code: "too-large",
                    "the body has \(length) bytes; the limit is \(maxBodyBytes)", context: context)
            }
        case .body:
            break
        case .end:
            requestStarted = nil
        }
        context.fireChannelRead(data)
    }

    /// A request still incomplete when a read ends needs a deadline. One timer per connection serves every
    /// request: it is not cancelled when a request ends, and when it fires it closes the connection only if the
    /// request then in progress is past its deadline (else it waits for that request's deadline).
    func channelReadComplete(context: ChannelHandlerContext) {
        if requestStarted != nil, timer == nil, !refused { armTimer(context: context) }
        context.fireChannelReadComplete()
    }

    private func armTimer(context: ChannelHandlerContext) {
        guard let requestStarted else { return }
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        timer = context.eventLoop.scheduleTask(
            deadline: requestStarted + .nanoseconds(Int64(requestTimeout.nanoseconds))
        ) {
            let (requestGuard, context) = bound.value
            requestGuard.timer = nil
            guard let started = requestGuard.requestStarted else { return }
            if NIODeadline.now() >= started + .nanoseconds(Int64(requestGuard.requestTimeout.nanoseconds)) {
                context.close(promise: nil)
            } else {
                requestGuard.armTimer(context: context)
            }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let error = error as? HTTPParserError {
            if case .headerOverflow = error {
                return refuse(
                    431, "Request Header Fields Too Large", code: "header-too-large",
                    "the request head is larger than the limit", context: context)
            }
            return refuse(
                400, "Bad Request", code: "malformed-request", "malformed HTTP request: \(error)", context: context)
        }
        context.fireErrorCaught(error)
    }

    /// Writes the refusal below the HTTP codec (as bytes) and closes the connection.
    private func refuse(_ status: Int, _ reason: String, code: String, _ detail: String, context: ChannelHandlerContext)
    {
        refused = true
        timer?.cancel()
        let body =
            #"{"detail":"\#(detail.replacingOccurrences(of: "\"", with: "'"))","status":\#(status),"title":"\#(reason)","type":"urn:herald:problem:\#(code)"}"#
        let text =
            "HTTP/1.1 \(status) \(reason)\r\ncontent-type: application/problem+json\r\ncontent-length: \(body.utf8.count)\r\nconnection: close\r\n\r\n\(body)"
        if let encoder = try? context.pipeline.syncOperations.context(handlerType: HTTPResponseEncoder.self) {
            let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
            encoder.writeAndFlush(NIOAny(ByteBuffer(string: text))).whenComplete { _ in
                bound.value.close(promise: nil)
            }
        } else {
            context.close(promise: nil)
        }
    }
}

/// Tells the `RequestGuard` (on the same event loop) when bytes arrive, before any decoding.
final class FirstByteWatcher: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    let requestGuard: RequestGuard

    init(guard requestGuard: RequestGuard) { self.requestGuard = requestGuard }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        requestGuard.bytesArrived()
        context.fireChannelRead(data)
    }
}
