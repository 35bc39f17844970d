import Crypto
import Foundation
import Herald
import Synchronization

/// Data keys for payload encryption: AES-256 keys by id. New events are sealed with `currentKeyID`; every key
/// in the ring still opens what it sealed, so rotating is "add a key, make it current, drop the old one once
/// nothing sealed with it is retained".
public struct KeyRing: Sendable {
    public private(set) var keys: [String: SymmetricKey]
    public private(set) var currentKeyID: String

    /// - Parameter keys: key id → 32 random bytes.
    public init(current: String, keys: [String: [UInt8]]) throws(EncryptionError) {
        guard keys[current] != nil else {
            throw EncryptionError(.unknownKey, "the current key '\(current)' is not in the ring")
        }
        for (id, bytes) in keys where bytes.count != 32 {
            throw EncryptionError(.unknownKey, "key '\(id)' has \(bytes.count) bytes; AES-256 needs 32")
        }
        self.keys = keys.mapValues { SymmetricKey(data: $0) }
        currentKeyID = current
    }

    /// A ring from `id=base64,id=base64` with the first key current (the `HERALD_ENCRYPTION_KEYS` format).
    public init(parsing text: String) throws(EncryptionError) {
        var keys: [String: [UInt8]] = [:]
        var first: String?
        for entry in text.split(separator: ",") {
            let parts = entry.split(separator: "=", maxSplits: 1)
            guard parts.count == 2, let bytes = Data(base64Encoded: String(parts[1])) else {
                throw EncryptionError(.unknownKey, "a key entry must be id=base64 (32 bytes)")
            }
            let id = parts[0].trimmingCharacters(in: .whitespaces)
            keys[id] = Array(bytes)
            if first == nil { first = id }
        }
        guard let first else { throw EncryptionError(.unknownKey, "no keys given") }
        try self.init(current: first, keys: keys)
    }

    /// Adds (or replaces) a key; with `makeCurrent`, new events are sealed with it.
    public mutating func add(id: String, key: [UInt8], makeCurrent: Bool) throws(EncryptionError) {
        guard key.count == 32 else { throw EncryptionError(.unknownKey, "AES-256 needs 32 key bytes") }
        keys[id] = SymmetricKey(data: key)
        if makeCurrent { currentKeyID = id }
    }

    /// Removes a retired key: what it sealed can no longer be opened.
    public mutating func remove(id: String) {
        guard id != currentKeyID else { return }
        keys.removeValue(forKey: id)
    }
}

public struct EncryptionError: Error, Hashable, Sendable, CustomStringConvertible {
    public enum Code: String, Sendable, Hashable {
        /// The key id is not in the ring (or a key is malformed).
        case unknownKey
        /// Authentication failed: the data or its attributes were changed, or the key is wrong.
        case tampered
        /// The event says it is encrypted but its fields are not usable.
        case malformed
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "EncryptionError.\(code.rawValue): \(message)" }
}

/// End-to-end payload encryption as a transport decorator: events are sealed with AES-256-GCM before they
/// reach the wrapped transport (so brokers, logs and networks carry only ciphertext) and opened in the consumer
/// before handlers see them.
///
/// A sealed event keeps its attributes in clear (routing, dedup and partitioning need them) and carries:
/// `data` = nonce ‖ ciphertext ‖ tag, `datacontenttype` = `application/vnd.herald.encrypted`, and the extensions
/// `enckeyid` (the key), `encalg` (`A256GCM`) and `enccontenttype` (the original content type, when there was
/// one). The id, source and type are bound as associated data, so data moved to another event does not open.
/// A delivery that does not open (tampered, unknown key) is terminated: it goes to the dead-letter topic with
/// the reason, and the handler never sees it.
public final class EncryptingTransport: EventTransport {
    public static let contentType = "application/vnd.herald.encrypted"
    public let inner: any EventTransport
    private let ring: Mutex<KeyRing>

    public init(wrapping inner: any EventTransport, keys: KeyRing) {
        self.inner = inner
        ring = Mutex(keys)
    }

    public var capabilities: TransportCapabilities { inner.capabilities }

    /// Rotates: seals new events with `id` from now on (older keys stay for opening).
    public func rotate(to id: String, key: [UInt8]) throws(EncryptionError) {
        try ring.withLock { ring throws(EncryptionError) in try ring.add(id: id, key: key, makeCurrent: true) }
    }

    public func publish(_ events: [CloudEvent], to topic: String) async throws -> [PublishAck] {
        let ring = self.ring.withLock { $0 }
        return try await inner.publish(try events.map { try EncryptingTransport.seal($0, with: ring) }, to: topic)
    }

    public func subscribe(topic: String, group: String, options: SubscribeOptions) async throws -> DeliveryStream {
        let source = try await inner.subscribe(topic: topic, group: group, options: options)
        let pump = Mutex<Task<Void, Never>?>(nil)
        let (stream, buffer) = DeliveryStream.make { pump.withLock { $0?.cancel() } }
        let task = Task { [self] in
            do {
                for try await delivery in source {
                    let keys = self.ring.withLock { $0 }
                    do {
                        let opened = try EncryptingTransport.open(delivery.event, with: keys)
                        let clear = Delivery(
                            event: opened, attempt: delivery.attempt, partition: delivery.partition,
                            offset: delivery.offset, settler: delivery.settler)
                        if !buffer.push(CollectionOfOne(clear)) { break }
                    } catch {
                        try? await delivery.terminate(reason: "the payload cannot be decrypted: \(error)")
                    }
                }
                buffer.finish()
            } catch {
                buffer.finish(throwing: error)
            }
        }
        pump.withLock { $0 = task }
        return stream
    }

    public func settle(_ deliveries: [Delivery], _ settlement: Settlement) async throws -> [Bool] {
        try await inner.settle(deliveries, settlement)
    }

    public func shutdown() async { await inner.shutdown() }

    // MARK: Sealing

    static func associatedData(_ event: CloudEvent) -> [UInt8] {
        Array("\(event.id.description)\n\(event.source)\n\(event.type)".utf8)
    }

    /// The event with its data sealed under the ring's current key (events without data pass unchanged).
    public static func seal(_ event: CloudEvent, with ring: KeyRing) throws -> CloudEvent {
        guard let plain = try event.data.encoded() else { return event }
        let key = ring.keys[ring.currentKeyID]!
        let box = try AES.GCM.seal(plain, using: key, authenticating: associatedData(event))
        var sealed = event
        let contentType = event.datacontenttype
        sealed.data = .bytes(Array(box.combined!))
        try sealed.setExtension("enccontenttype", contentType.map(ExtensionValue.string))
        sealed.datacontenttype = EncryptingTransport.contentType
        try sealed.setExtension("enckeyid", .string(ring.currentKeyID))
        try sealed.setExtension("encalg", .string("A256GCM"))
        return sealed
    }

    /// The event with its data opened; events that are not sealed pass unchanged.
    public static func open(_ event: CloudEvent, with ring: KeyRing) throws -> CloudEvent {
        guard event.datacontenttype == contentType else { return event }
        guard case .string(let keyID)? = event[extension: "enckeyid"],
            case .string("A256GCM")? = event[extension: "encalg"], case .bytes(let combined) = event.data
        else { throw EncryptionError(.malformed, "the event is marked encrypted but lacks enckeyid, encalg or data") }
        guard let key = ring.keys[keyID] else {
            throw EncryptionError(.unknownKey, "no key '\(keyID)' in the ring")
        }
        let plain: Data
        do {
            plain = try AES.GCM.open(
                AES.GCM.SealedBox(combined: combined), using: key, authenticating: associatedData(event))
        } catch {
            throw EncryptionError(.tampered, "the data or its id/source/type were changed (or the key is wrong)")
        }
        var opened = event
        let original: String?
        if case .string(let type)? = event[extension: "enccontenttype"] { original = type } else { original = nil }
        opened.data = .bytes(Array(plain))
        opened.datacontenttype = original
        try opened.setExtension("enccontenttype", nil)
        try opened.setExtension("enckeyid", nil)
        try opened.setExtension("encalg", nil)
        return opened
    }
}
