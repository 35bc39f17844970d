// libFuzzer entry point for the CloudEvents JSON decoder. Built by scripts/fuzz together with the codec's sources
// (they depend on nothing but the standard library, Foundation and Synchronization):
//   swiftc -sanitize=fuzzer,address -parse-as-library Fuzz/CloudEventFuzz.swift <codec sources> -o fuzz-cloudevents
// Any input must either decode or throw CloudEventError; a trap or a sanitizer report is a bug.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzCloudEvents(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    if let event = try? CloudEventJSON.decode(bytes) {
        // Whatever decodes must encode again and decode to the same attributes.
        if let encoded = try? CloudEventJSON.encode(event) {
            let again = try! CloudEventJSON.decode(encoded)
            precondition(again.id == event.id && again.type == event.type && again.source == event.source)
            precondition(again.time == event.time && again.subject == event.subject)
        }
    }
    _ = try? CloudEventJSON.decodeBatch(bytes)
    return 0
}
