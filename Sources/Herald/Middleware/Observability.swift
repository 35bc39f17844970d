import Instrumentation
import Logging
import Metrics
import ServiceContextModule
import Tracing

/// Logs each handled event at `level`, and failures at error level, with event and handler metadata.
public struct LoggingMiddleware: EventMiddleware {
    public var logger: Logger
    public var level: Logger.Level

    public init(logger: Logger = Logger(label: "herald.handler"), level: Logger.Level = .debug) {
        self.logger = logger
        self.level = level
    }

    public func handle(
        _ event: CloudEvent, context: EventContext, next: @Sendable (CloudEvent, EventContext) async throws -> Void
    ) async throws {
        let metadata: Logger.Metadata = [
            "event.id": "\(event.id)", "event.type": "\(event.type)", "handler": "\(context.handler)",
            "correlationid": "\(event.correlationid ?? "-")",
        ]
        do {
            try await next(event, context)
            logger.log(level: level, "handled", metadata: metadata)
        } catch {
            logger.error("handler failed", metadata: metadata.merging(["error": "\(error)"]) { $1 })
            throw error
        }
    }
}

/// Counts handled and failed events and times handlers (swift-metrics), by handler and event type.
public struct MetricsMiddleware: EventMiddleware {
    public init() {}

    public func handle(
        _ event: CloudEvent, context: EventContext, next: @Sendable (CloudEvent, EventContext) async throws -> Void
    ) async throws {
        let dimensions = [("handler", context.handler), ("type", event.type)]
        let start = monotonicNanoseconds()
        do {
            try await next(event, context)
            Counter(label: "herald_handled_total", dimensions: dimensions).increment()
        } catch {
            Counter(label: "herald_handler_errors_total", dimensions: dimensions).increment()
            throw error
        }
        Timer(label: "herald_handler_duration_seconds", dimensions: dimensions)
            .recordNanoseconds(Int64(monotonicNanoseconds() - start))
    }
}

/// Continues the trace carried in the event's `traceparent` (W3C trace context, via swift-distributed-tracing)
/// with a consumer span per handler; events the handler publishes through its context carry the span on.
public struct TracingMiddleware: EventMiddleware {
    public init() {}

    public func handle(
        _ event: CloudEvent, context: EventContext, next: @Sendable (CloudEvent, EventContext) async throws -> Void
    ) async throws {
        var parent = ServiceContext.current ?? .topLevel
        InstrumentationSystem.instrument.extract(event, into: &parent, using: CloudEventTraceExtractor())
        try await withSpan("\(event.type) process", context: parent, ofKind: .consumer) { span in
            span.attributes["messaging.message.id"] = event.id.description
            span.attributes["messaging.destination.name"] = event.type
            span.attributes["herald.handler"] = context.handler
            try await next(event, context)
        }
    }
}
