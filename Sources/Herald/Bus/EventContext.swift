import Instrumentation
import ServiceContextModule
import Tracing

/// What a handler knows about the event it handles, and how it publishes responses.
///
/// Events published through the context are stamped with `causationid` = the handled event's id and carry its
/// `correlationid` forward (the handled event's id when it had none), and the current trace context.
public struct EventContext: Sendable {
    /// The envelope of the event being handled.
    public let event: CloudEvent
    /// The bus the handler is registered on.
    public let bus: EventBus
    let registration: Registration

    /// The handler's name.
    public var handler: String { registration.name }
    /// The service the handler belongs to; responses are published with it as their `source`.
    public var service: String { registration.service }

    /// Publishes a response event and waits for its handlers (or the transport's acknowledgement).
    @discardableResult
    public func publish<E: Event>(_ response: E, _ attributes: EventAttributes = EventAttributes()) async throws
        -> PublishResult
    {
        try await bus.publish(self.response(response, attributes))
    }

    /// Posts a response event: returns once it is accepted.
    public func post<E: Event>(_ response: E, _ attributes: EventAttributes = EventAttributes()) async throws {
        try await bus.post(self.response(response, attributes), priority: attributes.priority)
    }

    /// The envelope of a response, stamped with causation, correlation and trace context.
    public func response<E: Event>(_ response: E, _ attributes: EventAttributes = EventAttributes()) -> CloudEvent {
        var attributes = attributes
        attributes.causationID = attributes.causationID ?? event.id.description
        attributes.correlationID = attributes.correlationID ?? event.correlationid ?? event.id.description
        var envelope = CloudEvent(response, source: service, attributes: attributes)
        if let current = ServiceContext.current {
            InstrumentationSystem.instrument.inject(current, into: &envelope, using: CloudEventTraceInjector())
        }
        if envelope.traceparent == nil, let parent = event.traceparent {
            envelope.traceparent = parent
            envelope.tracestate = event.tracestate
        }
        return envelope
    }
}

/// Writes trace propagation headers into an envelope's extensions: W3C `traceparent` and `tracestate` keep their
/// names; any other instrument's key is lowercased and stripped to `[a-z0-9]`, as extension names must be.
public struct CloudEventTraceInjector: Injector {
    public init() {}
    public func inject(_ value: String, forKey key: String, into carrier: inout CloudEvent) {
        try? carrier.setExtension(CloudEventTraceInjector.extensionName(forKey: key), .string(value))
    }

    /// The extension name a propagation header is carried under.
    public static func extensionName(forKey key: String) -> String {
        String(key.lowercased().unicodeScalars.filter { ("a"..."z").contains($0) || ("0"..."9").contains($0) })
    }
}

/// Reads trace propagation headers from an envelope's extensions (see `CloudEventTraceInjector`).
public struct CloudEventTraceExtractor: Extractor {
    public init() {}
    public func extract(key: String, from carrier: CloudEvent) -> String? {
        carrier[extension: CloudEventTraceInjector.extensionName(forKey: key)]?.description
    }
}
