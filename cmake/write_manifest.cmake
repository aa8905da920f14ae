# Writes ${MANIFEST_DIR}/manifest.json: each installed kernel library's size and SHA-256, the
# SHA-256 of the source it was built from, and the jaxlib whose FFI headers it was built against.
file(SHA256 "${KERNEL_SOURCE}" source_sha256)
set(entries "")
foreach(pair ${LIBRARIES})
  string(REPLACE "=" ";" pair "${pair}")
  list(GET pair 0 variant)
  list(GET pair 1 file_name)
  set(path "${MANIFEST_DIR}/${file_name}")
  file(SIZE "${path}" size)
  file(SHA256 "${path}" sha256)
  list(APPEND entries
    "    \"${variant}\": {\"file\": \"${file_name}\", \"size\": ${size}, \"sha256\": \"${sha256}\"}")
endforeach()
list(JOIN entries ",\n" entries)
file(WRITE "${MANIFEST_DIR}/manifest.json" "{
  \"format\": 1,
  \"jaxlib\": \"${JAXLIB_VERSION}\",
  \"compiler\": \"${CXX_COMPILER}\",
  \"source_sha256\": \"${source_sha256}\",
  \"libraries\": {
${entries}
  }
}
")
message(STATUS "jsoftmax: wrote ${MANIFEST_DIR}/manifest.json")
